"""Progress without a terminal: plain lines every N counts (fields, rate, ETA) and at the end; a tqdm
bar on a terminal; nothing when off."""
from neva.progress import Progress, duration


def test_plain_lines_without_a_terminal(capsys):
    bar = Progress(7, "train", unit="step", every=3, seconds=0, tty=False)
    for i in range(7):
        bar.update(1, loss=1.0 / (i + 1), **{"tokens/s": 3120.4})
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["train: step 3/7", "train: step 6/7", "train: step 7/7"]
    assert "loss 0.1667" in lines[1] and "tokens/s 3120" in lines[1] and "ETA " in lines[1]
    assert "took " in lines[2] and "ETA" not in lines[2]


def test_resumed_count_and_time_trigger(capsys):
    bar = Progress(10, "train", unit="step", initial=4, every=3, seconds=0, tty=False)
    bar.update(2)                                 # 6: a multiple of 3
    bar.update(1)
    bar.close()                                   # 7: the end of this segment, short of the total
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["train: step 6/10", "train: step 7/10"]
    bar = Progress(10, "scan", unit="sample", seconds=1e-9, tty=False)
    bar.update(1)                                 # no count trigger: the time one
    assert capsys.readouterr().out.startswith("scan: sample 1/10 |")


def test_terminal_bar_and_off(capsys):
    bar = Progress(3, "train", unit="step", every=1, tty=True)
    bar.update(1, loss=0.5)
    bar.write("a message")
    bar.close()
    out, err = capsys.readouterr()
    assert "train: step" not in out and "a message" in out + err and "train" in err   # tqdm draws on stderr
    off = Progress(3, "train", on=False, every=1, tty=False)
    off.update(3)
    off.write("x")
    off.close()
    assert capsys.readouterr() == ("", "")


def test_duration():
    assert [duration(s) for s in (7, 443, 7500)] == ["7s", "7m23s", "2h05m"]
