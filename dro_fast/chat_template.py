"""Chat messages and Jinja chat templates, rendered as transformers does.

A conversational prompt or completion is a tuple of `Message`s, an
immutable, hashable mapping with the keys "role" and "content" (TRL's
{"role", "content"} messages; other keys are not kept). `messages` turns any
sequence of such mappings into that form.

`render` renders a Hugging Face chat template (tokenizer_config.json's
"chat_template" or chat_template.jinja) the way transformers'
`apply_chat_template(..., tokenize=False)` does, so that the text, and so the
ids, equal what a transformers/TRL run would train on:
  * a sandboxed, immutable Jinja environment with trim_blocks and
    lstrip_blocks, and the loop controls (break, continue) extension;
  * the globals `raise_exception(message)` (raises TemplateError, here
    ChatTemplateError), `strftime_now(format)` (the local time now),
    `namespace` (no attribute starting with "_") and `dict`;
  * the filter `tojson` as json.dumps with ensure_ascii=False (Jinja's own
    escapes HTML characters), taking indent, separators and sort_keys;
  * a `{% generation %}...{% endgeneration %}` block renders its body (the
    tag marks assistant text for transformers' assistant masks);
  * the variables: `messages` (plain dicts), `tools` and `documents` (None),
    `add_generation_prompt`, the tokenizer's named special tokens as
    strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...) and
    any extra keyword arguments (e.g. `enable_thinking`).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import datetime
import functools
import json
from typing import Any

__all__ = ["ChatTemplateError", "Message", "is_conversation", "messages",
           "render", "Text"]

_KEYS = ("role", "content")

# A prompt or completion: text, or a conversation of {"role", "content"}
# mappings (Messages in records).
Text = str | Sequence[Mapping[str, str]]


class ChatTemplateError(ValueError):
  """A chat template failed to compile or render (raise_exception too)."""


class Message(Mapping):
  """One immutable, hashable chat message: {"role": ..., "content": ...}.

  Equal to any mapping with the same two items (a plain dict too), so rows
  compare with TRL's dicts; hashable, so records stay hashable.
  """

  __slots__ = ("_role", "_content")

  def __init__(self, role: str, content: str):
    if not isinstance(role, str) or not isinstance(content, str):
      raise TypeError(f"a Message's role and content must be strings, got "
                      f"{type(role).__name__} and {type(content).__name__}.")
    object.__setattr__(self, "_role", role)
    object.__setattr__(self, "_content", content)

  def __setattr__(self, name, value):
    raise AttributeError("Message is immutable.")

  @property
  def role(self) -> str:
    return self._role

  @property
  def content(self) -> str:
    return self._content

  def __getitem__(self, key: str) -> str:
    if key == "role":
      return self._role
    if key == "content":
      return self._content
    raise KeyError(key)

  def __iter__(self) -> Iterator[str]:
    return iter(_KEYS)

  def __len__(self) -> int:
    return 2

  def __hash__(self) -> int:
    return hash((self._role, self._content))

  def __eq__(self, other: object) -> bool:
    if isinstance(other, Message):
      return (self._role, self._content) == (other._role, other._content)
    return super().__eq__(other)

  def __repr__(self) -> str:
    return f"Message(role={self._role!r}, content={self._content!r})"

  def __reduce__(self):
    return Message, (self._role, self._content)


def messages(value: Iterable[Mapping[str, Any]]) -> tuple[Message, ...]:
  """`value`'s {"role", "content"} mappings as a tuple of Messages.

  Raises:
    TypeError: an item is not a mapping with string "role" and "content".
  """
  out = []
  for index, item in enumerate(value):
    if not isinstance(item, Mapping) or not all(
        isinstance(item.get(key), str) for key in _KEYS):
      raise TypeError(f"message {index} must be a mapping with string "
                      f"'role' and 'content', got {item!r}.")
    out.append(item if isinstance(item, Message)
               else Message(item["role"], item["content"]))
  return tuple(out)


def is_conversation(value: Any) -> bool:
  """Whether `value` is a conversation (a list/tuple of mappings), not text."""
  return isinstance(value, (list, tuple)) and all(
      isinstance(item, Mapping) for item in value)


def _raise_exception(message):
  import jinja2  # pylint: disable=g-import-not-at-top
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None,
            sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
  return datetime.datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=1)
def _environment():
  """transformers' chat-template environment (jinja2 imported only here)."""
  # jinja2 is needed only by chat models: importing it here keeps T5 runs
  # free of it.
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext  # pylint: disable=g-import-not-at-top
  from jinja2 import nodes  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  class Generation(ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders as its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",),
                                     drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [],
                             body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  class Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() refusing attributes that start with "_"."""

    def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
      self, args = args[0], args[1:]
      attrs = dict(*args, **kwargs)
      for name in attrs:
        Namespace.check(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      Namespace.check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not set the namespace attribute {name!r}.")

  class Dict:
    """The template's `dict`: builds plain dicts, exposes nothing else."""

    def __call__(self, *args, **kwargs):
      return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
      return dict.fromkeys(*args, **kwargs)

  environment = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[Generation, ext.loopcontrols])
  environment.filters["tojson"] = _tojson
  environment.globals["raise_exception"] = _raise_exception
  environment.globals["strftime_now"] = _strftime_now
  environment.globals["dict"] = Dict()
  environment.globals["namespace"] = Namespace
  return environment


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
  """`template` compiled in transformers' chat-template environment."""
  import jinja2  # pylint: disable=g-import-not-at-top
  try:
    return _environment().from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(
        f"the chat template does not compile (line {e.lineno}: {e.message})"
        "; fix chat_template in tokenizer_config.json or "
        "chat_template.jinja.") from None


def render(template: str, conversation: Iterable[Mapping[str, Any]], *,
           add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str] | None = None,
           **kwargs: Any) -> str:
  """Renders one conversation as apply_chat_template(tokenize=False) does.

  Args:
    template: the Jinja chat template.
    conversation: the messages, mappings with "role" and "content".
    add_generation_prompt: append the header that starts the assistant's
      turn (the prompt a completion follows).
    special_tokens: the tokenizer's named special tokens, e.g.
      {"bos_token": "<s>", "eos_token": "</s>"}; keyword arguments win over
      them, as in transformers.
    **kwargs: further template variables.

  Returns:
    The text.

  Raises:
    ChatTemplateError: the template does not compile, or fails while
      rendering (raise_exception included); the message says which.
  """
  import jinja2  # pylint: disable=g-import-not-at-top
  variables = dict(special_tokens or {})
  variables.update(kwargs)
  chat = [{key: value for key, value in message.items() if value is not None}
          for message in conversation]
  try:
    return _compiled(template).render(
        messages=chat, tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"the chat template raised: {e}") from None
