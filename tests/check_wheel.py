"""Checks an installed wheel: `python check_wheel.py SITE_DIR WHEEL_DIR`.

Run from outside the repository with SITE_DIR on PYTHONPATH (make
check-install): dro_fast.kernels must import from the wheel's files, and the
wheel must hold no top-level `kernels` package.
"""

import glob
import os
import sys
import zipfile


def main(site_dir: str, wheel_dir: str) -> None:
  (wheel,) = glob.glob(os.path.join(wheel_dir, "dro_fast-*.whl"))
  tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
  assert "kernels" not in tops, f"{wheel} installs a top-level kernels: {tops}"

  import dro_fast.kernels  # pylint: disable=g-import-not-at-top
  import dro_fast.losses  # pylint: disable=g-import-not-at-top,unused-import
  location = os.path.realpath(dro_fast.kernels.__file__)
  assert location.startswith(os.path.realpath(site_dir)), (
      f"dro_fast.kernels came from {location}, not the wheel in {site_dir}")
  assert {"xla", "chunked_xla", "pallas_tpu", "pallas_gpu"} <= set(
      dro_fast.kernels.IMPLEMENTATIONS)
  print(f"wheel OK: {os.path.basename(wheel)} -> {location}")


if __name__ == "__main__":
  main(*sys.argv[1:])
