"""scripts/wall_time.sh, the wall-time record of convergence.sh's PPO runs: one line per invocation, kept up to date
while the invocation runs, so that one killed part-way (SIGKILL, as at the end of a session) keeps its time."""

import contextlib
import os
import signal
import subprocess
import time

from helpers import ROOT


@contextlib.contextmanager
def started(cmd):
    """The command in a process group of its own, whatever of the group is left killed at the end."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def timed(script, wall_file, tick=1):
    prelude = f"source scripts/wall_time.sh; trap timed_end EXIT; WALL_TICK={tick}"
    return ["bash", "-c", f"{prelude}; {script}", "_", wall_file]


def lines(path):
    return [int(x) for x in open(path).read().split()]


def test_each_invocation_appends_its_seconds(tmp_path):
    wall = tmp_path / "run" / "wall_s.txt"  # the run directory does not exist yet
    for expected in ([2], [2, 1]):
        t0 = time.monotonic()
        cmd = timed(f'timed_start "$1"; sleep {expected[-1] + 0.2}; timed_end', str(wall))
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True, timeout=30)  # its output pipes closed too
        assert time.monotonic() - t0 < expected[-1] + 5  # no ticker left holding the caller
        got = lines(wall)
        assert len(got) == len(expected) and all(e <= g <= e + 2 for e, g in zip(expected, got)), got
    assert sorted(os.listdir(wall.parent)) == ["wall_s.txt"]


def test_an_invocation_killed_part_way_keeps_its_time_up_to_the_last_tick(tmp_path):
    wall = tmp_path / "wall_s.txt"
    wall.write_text("3766\n")  # an earlier invocation's line is kept
    with started(timed('timed_start "$1"; sleep 60', str(wall))) as proc:
        time.sleep(4.5)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the script, its ticker and the command, with no trap
        proc.wait(timeout=10)
    got = lines(wall)
    assert got[0] == 3766 and len(got) == 2 and 2 <= got[1] <= 5, got


def test_a_terminated_script_writes_its_time_on_exit(tmp_path):
    wall = tmp_path / "wall_s.txt"
    with started(timed('timed_start "$1"; sleep 60 & wait', str(wall), tick=100)) as proc:
        time.sleep(2.5)
        proc.terminate()  # kill -TERM to the shell: no tick yet, the EXIT trap writes the time
        proc.wait(timeout=10)
    assert 2 <= lines(wall)[0] <= 4, lines(wall)


def test_the_ticker_stops_with_its_shell(tmp_path):
    wall = tmp_path / "wall_s.txt"
    with started(timed('timed_start "$1"; sleep 60', str(wall))) as proc:
        time.sleep(1.5)
        proc.kill()  # the shell alone, SIGKILL: no trap; its ticker must not outlive it
        proc.wait(timeout=10)
        time.sleep(2.5)
        first = wall.read_text()
        time.sleep(2)
    assert wall.read_text() == first and 1 <= lines(wall)[0] <= 3, first
