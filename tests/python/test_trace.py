import json

import pytest

from pipegear import _C
from pipegear.trace import Trace, TraceEvent, plot_trace


def gpipe_events(stages, micro_batches, unit=1000, recompute=True):
    """GPipe's fill-drain timeline with unit-time cells (figure 2)."""
    events = []
    for s in range(stages):
        for j in range(micro_batches):
            start = (s + j) * unit
            events.append((s, j, "forward", False, start, start + unit))
        for j in reversed(range(micro_batches)):
            clock = micro_batches + stages - 1 + (stages - 1 - s) + (micro_batches - 1 - j)
            start = clock * unit
            events.append((s, j, "backward", recompute, start, start + unit))
    return events


def test_trace_from_tuples_and_properties():
    trace = _C.Trace(
        2,
        1,
        [
            (0, 0, "forward", False, 0, 10),
            (1, 0, "forward", False, 10, 20),
            (1, 0, "backward", False, 20, 30),
            (0, 0, "backward", True, 30, 40),
        ],
    )
    assert trace.stages == 2 and trace.micro_batches == 1 and len(trace) == 4
    assert trace.makespan == pytest.approx(40e-9)
    assert trace.bubble_fraction == pytest.approx(0.5)
    assert trace.theoretical_bubble_fraction == pytest.approx(0.5)
    last = trace.events[-1]
    assert (last.stage, last.micro_batch, last.phase, last.recompute) == (0, 0, "backward", True)
    assert (last.start_ns, last.end_ns, last.duration_ns) == (30, 40, 10)
    assert tuple(last) == (0, 0, "backward", True, 30, 40)
    assert last == TraceEvent(0, 0, "backward", True, 30, 40)
    assert "backward" in repr(last)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batches", [1, 2, 4, 8])
def test_unit_time_gpipe_bubble_is_theoretical(stages, micro_batches):
    trace = Trace(stages, micro_batches, gpipe_events(stages, micro_batches))
    expected = (stages - 1) / (micro_batches + stages - 1)
    assert trace.theoretical_bubble_fraction == pytest.approx(expected)
    assert trace.bubble_fraction == pytest.approx(expected)


def test_chrome_trace_is_json_with_every_cell(tmp_path):
    trace = Trace(3, 4, gpipe_events(3, 4))
    doc = json.loads(trace.to_chrome_trace())
    cells = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(cells) == 24
    assert {e["tid"] for e in cells} == {0, 1, 2}
    assert sum(e["cat"] == "forward" for e in cells) == 12
    assert min(e["ts"] for e in cells) == 0
    assert all(e["dur"] == pytest.approx(1.0) for e in cells)  # 1000 ns
    assert all(e["args"]["recompute"] == (e["cat"] == "backward") for e in cells)
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"stage 0", "stage 1", "stage 2"}

    path = tmp_path / "trace.json"
    trace.save_chrome_trace(path)
    assert json.loads(path.read_text()) == doc
    with pytest.raises(OSError):
        trace.save_chrome_trace(tmp_path / "missing" / "trace.json")


def test_trace_rejects_bad_events():
    with pytest.raises(ValueError):
        Trace(0, 1, [])
    with pytest.raises(IndexError, match="stage 2"):
        Trace(2, 1, [(2, 0, "forward", False, 0, 1)])
    with pytest.raises(IndexError, match="micro-batch 3"):
        Trace(2, 1, [(0, 3, "forward", False, 0, 1)])
    with pytest.raises(ValueError, match="before its start"):
        Trace(2, 1, [(0, 0, "forward", False, 5, 1)])
    with pytest.raises(ValueError, match="'sideways'"):
        Trace(2, 1, [(0, 0, "sideways", False, 0, 1)])
    with pytest.raises(ValueError, match="6 items"):
        Trace(2, 1, [(0, 0, "forward", False, 0)])
    with pytest.raises(TypeError):
        Trace(2, 1, [(0, 0, "forward", False, "zero", 1)])
    with pytest.raises(TypeError):
        Trace(2, 1, [42])


@pytest.mark.parametrize("recompute", [False, True])
def test_plot_trace_writes_a_png(tmp_path, recompute):
    pytest.importorskip("matplotlib")
    trace = Trace(4, 8, gpipe_events(4, 8, unit=1_000_000, recompute=recompute))
    path = tmp_path / "trace.png"
    plot_trace(trace, path, title="GPipe, K=4, M=8")
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    plot_trace(trace, str(tmp_path / "default_title.png"))
    assert (tmp_path / "default_title.png").stat().st_size > 1000


def test_plot_trace_rejects_empty_and_foreign_traces(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError):
        plot_trace(Trace(2, 2, []), tmp_path / "empty.png")
    with pytest.raises(TypeError):
        plot_trace([(0, 0, "forward", False, 0, 1)], tmp_path / "list.png")


def test_plot_trace_accepts_the_gpipe_wrapper(tmp_path):
    pytest.importorskip("matplotlib")
    from pipegear.gpipe import Trace as GPipeTrace

    wrapped = GPipeTrace(Trace(2, 2, gpipe_events(2, 2)))
    plot_trace(wrapped, tmp_path / "wrapped.png")
    assert (tmp_path / "wrapped.png").stat().st_size > 1000
