"""etc/enclaves.service and etc/enclaves.env agree with the server's options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from enclaves.tap import Options

ETC = Path(__file__).resolve().parent.parent.parent / "etc"


def _exec_start() -> list[str]:
    text = (ETC / "enclaves.service").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart=") :])


def _env() -> dict[str, str]:
    pairs = {}
    for line in (ETC / "enclaves.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name] = value
    return pairs


def test_every_variable_of_the_unit_is_set_in_the_env_file() -> None:
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", " ".join(_exec_start())))
    assert used and used <= set(_env())


def test_the_unit_command_line_parses(tmp_path: Path) -> None:
    env = _env()
    admin_keys = tmp_path / "admin_keys"
    admin_keys.write_text((ETC / "admin_keys.example").read_text())
    env["ENCLAVES_ADMIN_KEYS"] = str(admin_keys)
    argv = _exec_start()
    assert argv[:4] == ["/opt/enclaves/.venv/bin/twistd", "--nodaemon", "--pidfile=", "--logfile=-"]
    args = []
    for arg in argv[argv.index("enclaves") + 1 :]:
        if arg == "$ENCLAVES_EXTRA_ARGS":
            args += env["ENCLAVES_EXTRA_ARGS"].split()
            continue
        args.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], arg))
    options = Options()
    options.parseOptions(args)
    assert options["data-dir"] == Path("/var/lib/enclaves")
    assert options["manhole"] == "tcp:7522:interface=127.0.0.1"
    assert options["admin-keys"] == admin_keys


def test_state_directories_match_the_env_file() -> None:
    unit = (ETC / "enclaves.service").read_text()
    (line,) = [ln for ln in unit.splitlines() if ln.startswith("StateDirectory=")]
    dirs = {f"/var/lib/{name}" for name in line.split("=", 1)[1].split()}
    env = _env()
    assert env["ENCLAVES_DATA_DIR"] in dirs
    assert str(Path(env["ENCLAVES_KEY_FILE"]).parent) in dirs
