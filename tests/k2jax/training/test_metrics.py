"""Metrics: a resumed run's metrics.jsonl and TensorBoard read as one run; throughput counts finished steps only;
trained-token rates and the conversations cut to a row, summed between rows."""

from k2jax.training.metrics import MetricWriter, Throughput, read_metrics, read_tensorboard


def _log(workdir, steps, start_step, value):
    w = MetricWriter(str(workdir), tensorboard=True, start_step=start_step)
    for step in steps:
        w.write(step, {"loss": value + step, "attn_max_logit": [[1.0, 2.0]]})
    w.close()


def test_a_resumed_run_replaces_what_was_logged_after_its_checkpoint(tmp_path):
    _log(tmp_path, range(10), 0, 100.0)  # killed at step 9; its last checkpoint was step 6
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')  # a row the kill cut short
    _log(tmp_path, range(6, 12), 6, 200.0)  # the resumed run
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == list(range(12))
    assert [r["loss"] for r in rows] == [100.0 + s for s in range(6)] + [200.0 + s for s in range(6, 12)]
    board = read_tensorboard(str(tmp_path))
    assert board["loss"] == [(s, 100.0 + s) for s in range(6)] + [(s, 200.0 + s) for s in range(6, 12)]
    assert [s for s, _ in board["attn_max_logit/max"]] == list(range(12))
    _log(tmp_path, range(0, 2), 0, 300.0)  # a fresh run in the same workdir (no checkpoint): only its own rows
    assert [r["loss"] for r in read_metrics(str(tmp_path))] == [300.0, 301.0]
    assert read_tensorboard(str(tmp_path))["loss"] == [(0, 300.0), (1, 301.0)]


def test_throughput_counts_the_steps_finished_between_marks():
    t = Throughput()
    assert t.mark(10.0, 1) is None  # the clock starts (after the first step: no compilation, no warm-up)
    assert t.mark(11.0, 3) == (2, 1.0)
    # synchronous dispatch: step 4 had already run when step 3's metrics were fetched; the next fetch, of a step
    # that had also already run, finds no step finished since: the last window again rather than a near-zero one,
    # and the clock keeps running from the mark that counted the step (a run's last row gets a throughput too)
    assert t.mark(11.5, 5) == (2, 0.5)
    assert t.mark(11.5001, 5) == (2, 0.5)
    assert t.mark(12.5, 7) == (2, 1.0)
    t.mark_after_pause(20.0, 7)  # a checkpoint save: its time is nobody's step
    assert t.mark(21.0, 9) == (2, 1.0)


def test_trained_token_rates_and_conversation_counts_between_rows():
    from k2jax.training.metrics import RowSums, describe_conversations, describe_rates, token_rates
    rates = token_rates({"tokens": 1000, "trained_tokens": 250}, steps=2, seconds=4.0)
    assert rates == {"tokens_per_s": 500.0, "trained_tokens_per_s": 125.0}
    assert describe_rates(rates, trained=True) == ", 500 tok/s (125 trained)"
    assert describe_rates(rates, trained=False) == ", 500 tok/s"
    assert token_rates({"tokens": 10}, 1, 1.0)["trained_tokens_per_s"] == 10.0  # data without loss weights
    sums = RowSums(("conversations_truncated", "conversations_dropped"))
    for truncated in (1, 0, 2):  # three steps, then a row
        sums.add({"conversations_truncated": truncated, "conversations_dropped": 0, "loss": 1.0})
    counts = sums.take()
    assert counts == {"conversations_truncated": 3, "conversations_dropped": 0}
    assert describe_conversations(counts) == "; conversations longer than a row since the last line: 3 truncated"
    assert sums.take() == {"conversations_truncated": 0, "conversations_dropped": 0}  # the next row: none since
    assert describe_conversations({}) == "" and RowSums(("x",)).take() == {}  # data without counts
    split = {"conversations_truncated": 1, "conversations_dropped": 2, "conversations_split": 2, "split_sequences": 5}
    assert describe_conversations(split) == ("; conversations longer than a row since the last line: 1 truncated, "
                                             "2 dropped; 2 conversations split into 5 sequences since the last line")
    assert describe_conversations({**split, "conversations_truncated": 0, "conversations_dropped": 0}) == (
        "; 2 conversations split into 5 sequences since the last line")
