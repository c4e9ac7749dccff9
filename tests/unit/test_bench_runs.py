"""The end-to-end benchmarks' progress marks: a counter read from a job's log, and the steady rate."""

from __future__ import annotations

from hscr_platform.bench.runs import last_number, steady_rate


def test_the_counter_reads_the_last_step_of_whole_lines_only(tmp_path):
    log = tmp_path / "train.log"
    count = last_number(log, r"\[train\] step (\d+)/")
    assert count() == 0  # no log yet
    log.write_text("(RayTrainWorker pid=1) [train] step 25/90 loss=0.5\n(RayTrainWorker pid=1) [train] step 50/9")
    assert count() == 25  # the half-written line is not read yet
    with log.open("a") as fh:
        fh.write("0 loss=0.4\nsomething else\n")
    assert count() == 50
    with log.open("a") as fh:
        fh.write("nothing new\n")
    assert count() == 50


def test_steady_rate_leaves_out_the_time_before_the_first_mark():
    # start-up 30 s, then 512 rows every 10 s: (2048 - 512) / (60 - 30)
    assert steady_rate([(30.0, 512), (40.0, 1024), (50.0, 1536), (60.0, 2048)]) == 51.2
    assert steady_rate([(30.0, 512)]) is None and steady_rate([]) is None
