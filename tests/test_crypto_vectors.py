"""The crypto core against external vectors in ../shared/vectors (Wycheproof, NIST, RFCs)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclaves import crypto
from tests.conftest import load_vectors


def _cases(name: str, key_bits: int | None = None) -> list[tuple[dict, dict]]:
    data = load_vectors(name)
    cases = [
        (group, case)
        for group in data["testGroups"]
        for case in group["tests"]
        if key_bits is None or group.get("keySize") == key_bits
    ]
    assert cases, f"no cases read from {name}"
    return cases


def _ids(cases: list[tuple[dict, dict]]) -> list[str]:
    return [f"tc{case['tcId']}" for _, case in cases]


CBC = _cases("wycheproof/aes_cbc_pkcs5_test.json")


def test_cbc_vector_count() -> None:
    assert len(CBC) == 216


@pytest.mark.parametrize(("group", "case"), CBC, ids=_ids(CBC))
def test_aes_cbc_pkcs7(group: dict, case: dict) -> None:
    key, iv = bytes.fromhex(case["key"]), bytes.fromhex(case["iv"])
    msg, ct = bytes.fromhex(case["msg"]), bytes.fromhex(case["ct"])
    if case["result"] == "valid":
        assert crypto.cbc_encrypt(key, iv, msg) == ct
        assert crypto.cbc_decrypt(key, iv, ct) == msg
    else:
        with pytest.raises(crypto.CryptoError):
            crypto.cbc_decrypt(key, iv, ct)


CMAC = _cases("wycheproof/aes_cmac_test.json", key_bits=256)


def test_cmac_vector_count() -> None:
    assert len(CMAC) == 102


@pytest.mark.parametrize(("group", "case"), CMAC, ids=_ids(CMAC))
def test_aes256_cmac_wycheproof(group: dict, case: dict) -> None:
    key, msg, tag = (bytes.fromhex(case[k]) for k in ("key", "msg", "tag"))
    computed = crypto.cmac_tag(key, msg)[: group["tagSize"] // 8]
    if case["result"] == "valid":
        assert computed == tag
        crypto.cmac_verify(key, msg, tag)
        # The project's keyed Sealer computes the same MAC.
        sealer = crypto.Sealer(crypto.KeyPair(bytes(b ^ 0xFF for b in key), key))
        assert sealer.mac(msg) == tag
        sealer.verify(tag, msg)
    else:
        assert computed != tag
        with pytest.raises(crypto.CryptoError):
            crypto.cmac_verify(key, msg, tag)


def test_aes256_cmac_nist() -> None:
    data = load_vectors("nist_cmac_aes256.json")
    key = bytes.fromhex(data["key"])
    assert len(data["tests"]) == 5
    for case in data["tests"]:
        msg, tag = bytes.fromhex(case["msg"]), bytes.fromhex(case["tag"])
        assert len(msg) == case["msgLen"]
        assert crypto.cmac_tag(key, msg) == tag
        crypto.cmac_verify(key, msg, tag)


X25519 = _cases("wycheproof/x25519_test.json")


@pytest.mark.parametrize(("group", "case"), X25519, ids=_ids(X25519))
def test_x25519_wycheproof(group: dict, case: dict) -> None:
    private, public = bytes.fromhex(case["private"]), bytes.fromhex(case["public"])
    shared = bytes.fromhex(case["shared"])
    if "ZeroSharedSecret" in case["flags"]:
        # The project refuses an all-zero shared secret (a low-order peer key).
        with pytest.raises(crypto.CryptoError):
            crypto.x25519(private, public)
    elif case["result"] in ("valid", "acceptable"):
        assert crypto.x25519(private, public) == shared
    else:
        with pytest.raises(crypto.CryptoError):
            crypto.x25519(private, public)


def test_x25519_rfc7748() -> None:
    data = load_vectors("rfc7748_x25519.json")
    for case in data["tests"]:
        if case["type"] == "scalarmult":
            out = crypto.x25519(bytes.fromhex(case["scalar"]), bytes.fromhex(case["u"]))
            assert out.hex() == case["output"]
        elif case["type"] == "iterated":
            k, u = bytes.fromhex(case["k0"]), bytes.fromhex(case["u0"])
            for _ in range(case["iterations"]):
                k, u = crypto.x25519(k, u), k
            assert k.hex() == case["output"]
        else:
            alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(case["alice_private"]))
            bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(case["bob_private"]))
            assert crypto.x25519_public(alice).hex() == case["alice_public"]
            assert crypto.x25519_public(bob).hex() == case["bob_public"]
            shared = crypto.x25519(alice, bytes.fromhex(case["bob_public"]))
            assert shared == crypto.x25519(bob, bytes.fromhex(case["alice_public"]))
            assert shared.hex() == case["shared"]


HKDF = _cases("wycheproof/hkdf_sha256_test.json")


@pytest.mark.parametrize(("group", "case"), HKDF, ids=_ids(HKDF))
def test_hkdf_wycheproof(group: dict, case: dict) -> None:
    ikm, salt, info = (bytes.fromhex(case[k]) for k in ("ikm", "salt", "info"))
    if case["result"] == "valid":
        assert crypto.hkdf_sha256(ikm, salt, info, case["size"]).hex() == case["okm"]
    else:
        with pytest.raises(crypto.CryptoError):
            crypto.hkdf_sha256(ikm, salt, info, case["size"])


def test_hkdf_rfc5869() -> None:
    data = load_vectors("rfc5869_hkdf_sha256.json")
    assert len(data["tests"]) == 3
    for case in data["tests"]:
        salt = bytes.fromhex(case["salt"]) or None
        okm = crypto.hkdf_sha256(
            bytes.fromhex(case["ikm"]), salt, bytes.fromhex(case["info"]), case["L"]
        )
        assert okm.hex() == case["okm"]
