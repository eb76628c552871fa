"""Old and new commit's T5-small DRO-V CPU step in two persistent worker
processes, stepped alternately (one step each per round, order swapped every
round), so both see the same load; prints per-round times and the paired
ratio."""
import json, statistics, subprocess, sys
rounds = int(sys.argv[1])
py = "/work/main/.venv/bin/python"
env_old = {"PYTHONPATH": "/tmp/old_site", "PATH": "/usr/bin:/bin"}
env_new = {"PATH": "/usr/bin:/bin"}
procs = {name: subprocess.Popen([py, "/work/ab/ab_worker.py"], cwd="/tmp", env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
         for name, env in (("old", env_old), ("new", env_new))}
for name, p in procs.items():
  print(name, p.stdout.readline().strip(), flush=True)
times = {"old": [], "new": []}
for r in range(rounds):
  order = ("old", "new") if r % 2 == 0 else ("new", "old")
  for name in order:
    procs[name].stdin.write("step\n"); procs[name].stdin.flush()
    rec = json.loads(procs[name].stdout.readline())
    times[name].append(rec["step_s"])
  print(f"round {r + 1}: old {times['old'][-1]:.3f}  new {times['new'][-1]:.3f}", flush=True)
for p in procs.values():
  p.stdin.close(); p.wait()
ratios = [n / o for o, n in zip(times["old"], times["new"])]
print(json.dumps(dict(old=times["old"], new=times["new"],
                      median_old=statistics.median(times["old"]),
                      median_new=statistics.median(times["new"]),
                      paired_new_over_old=statistics.median(ratios))))
