"""``twistd enclaves`` option parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from enclaves.tap import Options


def test_admin_keys_default_is_used_only_when_present(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions([f"--data-dir={tmp_path}"])
    assert options["admin-keys"] is None
    (tmp_path / "admin_keys").write_text("# none yet\n")
    options = Options()
    options.parseOptions([f"--data-dir={tmp_path}"])
    assert options["admin-keys"] == tmp_path / "admin_keys"


def test_manhole_help_and_docs_name_both_ways_to_turn_it_on() -> None:
    """DATA-DIR/admin_keys turns the shell on as well as --admin-keys: both texts say so."""
    (manhole,) = [p for p in Options.optParameters if p[0] == "manhole"]
    assert "--admin-keys FILE, or DATA-DIR/admin_keys" in manhole[3]
    docs = (Path(__file__).parent.parent / "docs" / "admin.rst").read_text()
    (row,) = [i for i, line in enumerate(docs.splitlines()) if line.startswith("``--manhole``")]
    cells = " ".join(line[58:] for line in docs.splitlines()[row : row + 3])
    assert "``--admin-keys`` or ``DATA-DIR/admin_keys``" in " ".join(cells.split())


def test_missing_explicit_admin_keys_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="no such file"):
        Options().parseOptions([f"--admin-keys={tmp_path / 'nope'}"])


@pytest.mark.parametrize(
    "value", ["12", "1024", "4095", "65537", "131072", "16777216", "abc", "99999999999"]
)
def test_max_frame_bounds(value: str) -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions([f"--max-frame={value}"])


def test_max_frame_floor_fits_a_kex_blob() -> None:
    from enclaves.session import max_blob_size
    from enclaves.tap import MIN_MAX_FRAME

    assert Options().parseOptions([f"--max-frame={MIN_MAX_FRAME}"]) is None
    assert max_blob_size(MIN_MAX_FRAME) >= 1253 + 1000


def test_the_server_freezes_its_start_up_objects_once_the_reactor_runs(tmp_path: Path) -> None:
    """makeService ends with FreezeStartupObjects; it freezes only when the reactor runs."""
    import gc

    from twisted.internet.task import Clock

    from enclaves.server.lifecycle import FreezeStartupObjects
    from enclaves.tap import makeService

    class NotRunning(Clock):
        """A clock that keeps callWhenRunning calls instead of running them."""

        def __init__(self) -> None:
            super().__init__()
            self.when_running: list = []  # type: ignore[type-arg]

        def callWhenRunning(self, f, *a, **kw):  # type: ignore[no-untyped-def]
            self.when_running.append(lambda: f(*a, **kw))

    options = Options()
    options.parseOptions([f"--data-dir={tmp_path}", "--listen=tcp:0:interface=127.0.0.1"])
    top = makeService(options, NotRunning())
    freezers = [s for s in top if isinstance(s, FreezeStartupObjects)]  # type: ignore[attr-defined]
    assert len(freezers) == 1 and list(top)[-1] is freezers[0]  # type: ignore[call-overload]
    reactor = NotRunning()
    service = FreezeStartupObjects(reactor)
    assert gc.get_freeze_count() == 0
    service.startService()
    assert gc.get_freeze_count() == 0 and len(reactor.when_running) == 1
    try:
        reactor.when_running[0]()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_max_handshakes_per_address_defaults_to_the_factory_rule() -> None:
    """Not given, it is None: ServerFactory then takes 32, or a quarter of
    --max-connections if less (docs/admin.rst)."""
    options = Options()
    options.parseOptions([])
    assert options["max-handshakes-per-address"] is None
    options = Options()
    options.parseOptions(["--max-handshakes-per-address=500"])
    assert options["max-handshakes-per-address"] == 500
    options = Options()
    options.parseOptions(["--max-handshakes-per-address=0"])  # 0: no share at all
    assert options["max-handshakes-per-address"] == 0
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--max-handshakes-per-address=-1"])


def test_the_signal_handler_only_hands_the_stop_to_the_reactor() -> None:
    """A signal handler may run inside the log observer, which holds a lock:
    it must not log (that deadlocked a twistd in CI). It queues the stop; the
    reactor's turn logs and stops, once even if the signal comes twice."""
    import signal

    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import globalLogPublisher

    from enclaves.server.lifecycle import CleanExitOnSignals

    class Reactor:  # what the service uses of one: its thread queue and stop
        def __init__(self) -> None:
            self.queued: list = []  # type: ignore[type-arg]
            self.stops = 0

        def callFromThread(self, f, *args):  # type: ignore[no-untyped-def]
            self.queued.append((f, args))

        def stop(self) -> None:
            self.stops += 1
            if self.stops > 1:
                raise ReactorNotRunning()

    events: list[dict] = []  # type: ignore[type-arg]
    globalLogPublisher.addObserver(events.append)
    try:
        reactor = Reactor()
        service = CleanExitOnSignals(reactor)
        service._stop(signal.SIGTERM, None)
        service._stop(signal.SIGTERM, None)
        assert events == [] and reactor.stops == 0 and len(reactor.queued) == 2
        for f, args in reactor.queued:
            f(*args)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert reactor.stops == 2
    assert [e["log_format"] for e in events] == ["received {signal}, shutting down"] * 2
