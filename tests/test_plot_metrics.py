"""metrics sinks and plots, from records shaped like the recipe's."""

import pytest

from rft_ds import plot
from rft_ds.metrics import MetricsLog, TensorBoardSink, scalars


def records(n=6):
    out = []
    for e in range(n):
        grow = e % 2 == 0
        r = {
            "epoch": e,
            "grow_step": grow,
            "percentile": 0.7 if grow else 0.95,
            "n_sampled": 64 if grow else 0,
            "pool_size": 64 * (e // 2 + 1),
            "n_selected": 10 + e,
            "n_prompts_kept": 5 + e,
            "reward_mean": 0.1 * e,
            "reward_max": 1.0,
            "selected_reward_mean": 0.9,
            "threshold_mean": 0.5 + 0.05 * e,
            "train_loss": 1.0 / (e + 1),
            "time_train": 2.0,
            "selection_digest": "abc",
        }
        if grow:
            r.update(sampled_reward_mean=0.1 * e, sampled_reward_max=0.2 * e)
        if e % 2 == 1:
            r.update(eval_reward_mean=0.2 + 0.1 * e, eval_accuracy=0.1 * e)
        if e == 0:
            r.update(eval_reward_mean_initial=0.125, eval_accuracy_initial=0.0)
        out.append(r)
    return out


def _labels(name, recs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plot.DRAW[name](ax, recs)
    labels = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for a in fig.axes for line in a.lines}
    plt.close(fig)
    return labels


def test_panels_have_the_expected_series():
    recs = records()
    reward = _labels("reward", recs)
    assert reward["sampled mean"][0] == [1, 3, 5]  # grow epochs only, x = epochs done
    assert reward["sampled max"][1] == pytest.approx([0.0, 0.4, 0.8])
    assert set(reward) >= {"kept mean", "pool mean"}
    assert set(_labels("threshold", recs)) == {"threshold (mean over prompts)", "percentile"}
    assert set(_labels("kept", recs)) == {"kept completions", "pool size", "prompts with a kept completion"}
    ev = _labels("eval", recs)
    assert ev["eval reward (held out)"] == ([0, 2, 4, 6], pytest.approx([0.125, 0.3, 0.5, 0.7]))  # 0: before training
    assert ev["accuracy"][0] == [0, 2, 4, 6]  # metric_fn's numbers too, before training included
    assert _labels("loss", recs)["train loss (kept completions)"][1] == pytest.approx([1 / (e + 1) for e in range(6)])


def test_time_panel_stacks_the_stages():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plot.DRAW["time"](ax, [{"epoch": 0, "time_sample": 3.0, "time_train": 5.0}, {"epoch": 1, "time_train": 4.0}])
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
    assert bars == {"sample": [3.0, 0.0], "train": [5.0, 4.0]}
    plt.close(fig)


def test_plot_files_written_by_the_cli(tmp_path, capsys):
    log = MetricsLog(tmp_path, enabled=True)
    for r in records():
        log.log(r)
    assert plot.main([str(tmp_path)]) == 0
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert names == {f"{n}.png" for n in ("summary", *plot.PANELS)}
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert str(tmp_path / "plots" / "summary.png") in capsys.readouterr().out


def test_plot_cli_errors_are_one_line(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": \n')
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_scalars_grouping():
    s = scalars(
        {
            "epoch": 3,
            "grow_step": True,
            "train_loss": 0.5,
            "eval_accuracy": 1,
            "time_train": 2.0,
            "selection_digest": "x",
            "sampled_reward_mean": None,
            "eval_reward_mean_initial": 0.1,
        }
    )
    assert s == {"train/train_loss": 0.5, "eval/accuracy": 1.0, "time/train": 2.0}


def test_tensorboard_events_hold_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, enabled=True, sinks=[TensorBoardSink(tmp_path / "tb")])
    log.log_initial_eval({"eval_reward_mean": 0.125})
    for r in records(4):
        log.log(r)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("eval/reward_mean")] == [(0, 0.125), (2, 0.3), (4, 0.5)]
    assert [e.step for e in acc.Scalars("train/train_loss")] == [1, 2, 3, 4]
    assert "train/n_selected" in acc.Tags()["scalars"]
