"""Client core cost per message, per KEX and per keystore save; prints JSON.

Run from the source tree: ``python bench/client_core.py``.  The baseline is a
bare ``Sealer.seal`` + ``Sealer.open`` of the same text measured in the same run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enclaves.client.core import ClientCore, SendBlob
from enclaves.client.keystore import Keystore
from enclaves.crypto import KeyPair, Sealer

A, B = 1001, 2002
TEXT = "a typical chat line of some sixty characters, give or take.."


def per_call(fn: object, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / count


def main() -> None:
    keys = KeyPair.generate()
    a = ClientCore.new(A, KeyPair.generate())
    b = ClientCore.new(B, KeyPair.generate())
    (offer,) = a.start_kex(B, 0.0)
    accept = next(
        e for e in b.handle_blob(A, offer.msg_id, offer.blob, 0.0) if isinstance(e, SendBlob)
    )
    a.handle_blob(B, accept.msg_id, accept.blob, 0.0)

    def kex_round() -> None:
        x, y = ClientCore.new(A, keys), ClientCore.new(B, keys)
        (o,) = x.start_kex(B, 0.0)
        acc = next(e for e in y.handle_blob(A, o.msg_id, o.blob, 0.0) if isinstance(e, SendBlob))
        x.handle_blob(B, acc.msg_id, acc.blob, 0.0)

    def message() -> None:
        out = a.encrypt_message(B, TEXT, 1.0, confirmed=True)
        assert isinstance(out, SendBlob)
        a.on_accepted(out.msg_id)
        b.handle_blob(A, out.msg_id, out.blob, 1.0)

    sealer = Sealer(keys)
    body = TEXT.encode()

    def baseline() -> None:
        sealer.open(b"aad", sealer.seal(b"aad", body))

    count = 2000
    result = {
        "baseline_seal_open_us": round(per_call(baseline, count) * 1e6, 1),
        "message_encrypt_and_receive_us": round(per_call(message, count) * 1e6, 1),
        "kex_full_exchange_ms": round(per_call(kex_round, 50) * 1e3, 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = Keystore.create(Path(tmp) / "ks", "bench passphrase", b.state())
        result["keystore_create_with_argon2id_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        state = b.state()
        result["history_lines_saved"] = sum(len(v) for v in state.history.values())
        result["keystore_save_ms"] = round(per_call(lambda: store.save(state), 20) * 1e3, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
