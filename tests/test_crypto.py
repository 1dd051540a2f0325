"""Packet protection: known answers from the specs, and strict KEX against a hand-rolled client.

The expected packets are computed here independently of nuttconch.crypto:
ChaCha20 and Poly1305 in plain Python (anchored to the RFC 8439 test
vectors), GCM as AES blocks plus a plain-Python GHASH (anchored to the
McGrew-Viega test cases), CTR as AES of counter blocks with the stdlib HMAC.
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import os
import socket
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.conch.ssh.common import MP, NS, getNS
from twisted.internet import defer, threads
from twisted.trial import unittest

from nuttconch import config, crypto
from nuttconch.crypto import (
    CIPHERS,
    MACS,
    ChachaOpener,
    ChachaSealer,
    CtrOpener,
    CtrSealer,
    GcmOpener,
    GcmSealer,
    Opener,
    PacketError,
    Sealer,
)
from nuttconch.transport import SwitchboardTransport

from .harness import SwitchboardTestMixin

M32 = 0xFFFFFFFF


def fixed_pad(n: int) -> bytes:
    return bytes(range(1, n + 1))


# -- independent reference implementations ----------------------------------------------


def _rotl(v: int, c: int) -> int:
    return ((v << c) & M32) | (v >> (32 - c))


def _qr(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & M32
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & M32
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & M32
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & M32
    s[b] = _rotl(s[b] ^ s[c], 7)


def chacha_block(key: bytes, words: tuple[int, int, int, int]) -> bytes:
    """One ChaCha20 block; ``words`` are state words 12..15 (counter and nonce)."""
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8L", key), *words]
    w = state[:]
    for _ in range(10):
        _qr(w, 0, 4, 8, 12)
        _qr(w, 1, 5, 9, 13)
        _qr(w, 2, 6, 10, 14)
        _qr(w, 3, 7, 11, 15)
        _qr(w, 0, 5, 10, 15)
        _qr(w, 1, 6, 11, 12)
        _qr(w, 2, 7, 8, 13)
        _qr(w, 3, 4, 9, 14)
    return struct.pack("<16L", *[(a + b) & M32 for a, b in zip(w, state, strict=True)])


def chacha_djb(key: bytes, nonce8: bytes, counter: int, data: bytes) -> bytes:
    """The original ChaCha20 (64-bit counter, 64-bit nonce) that OpenSSH uses."""
    n0, n1 = struct.unpack("<2L", nonce8)
    out = bytearray()
    for i in range(0, len(data), 64):
        c = counter + i // 64
        block = chacha_block(key, (c & M32, c >> 32, n0, n1))
        out += bytes(x ^ y for x, y in zip(data[i : i + 64], block, strict=False))
    return bytes(out)


def poly1305(key: bytes, msg: bytes) -> bytes:
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:], "little")
    p = (1 << 130) - 5
    acc = 0
    for i in range(0, len(msg), 16):
        acc = (acc + int.from_bytes(msg[i : i + 16] + b"\x01", "little")) * r % p
    return ((acc + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def _gf_mult(x: int, y: int) -> int:
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return z


def _blocks(data: bytes) -> list[bytes]:
    data += bytes(-len(data) % 16)
    return [data[i : i + 16] for i in range(0, len(data), 16)]


def gcm_reference(key: bytes, iv: bytes, plain: bytes, aad: bytes) -> bytes:
    """NIST SP 800-38D GCM from the AES block function and a plain-Python GHASH."""
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    h = int.from_bytes(ecb.update(bytes(16)), "big")
    j0 = iv + b"\0\0\0\1"
    stream = b"".join(
        ecb.update(iv + struct.pack(">L", 2 + i)) for i in range((len(plain) + 15) // 16)
    )
    ct = bytes(a ^ b for a, b in zip(plain, stream, strict=False))
    y = 0
    for blk in [*_blocks(aad), *_blocks(ct), struct.pack(">QQ", len(aad) * 8, len(ct) * 8)]:
        y = _gf_mult(y ^ int.from_bytes(blk, "big"), h)
    tag = (int.from_bytes(ecb.update(j0), "big") ^ y).to_bytes(16, "big")
    return ct + tag


def ctr_reference(key: bytes, iv: bytes, offset_blocks: int, data: bytes) -> bytes:
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    start = int.from_bytes(iv, "big") + offset_blocks
    stream = b"".join(
        ecb.update(((start + i) % (1 << 128)).to_bytes(16, "big"))
        for i in range((len(data) + 15) // 16)
    )
    return bytes(a ^ b for a, b in zip(data, stream, strict=False))


class ReferenceSelfTests(unittest.TestCase):
    """The references reproduce the published vectors, so they can judge nuttconch."""

    def test_chacha20_block_rfc8439_2_3_2(self) -> None:
        """The reference ChaCha20 block function gives RFC 8439's test vector 2.3.2."""
        key = bytes(range(32))
        nonce = bytes.fromhex("000000090000004a00000000")
        words = (1, *struct.unpack("<3L", nonce))
        self.assertEqual(
            chacha_block(key, words).hex(),
            "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
            "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e",
        )

    def test_poly1305_rfc8439_2_5_2(self) -> None:
        """The reference Poly1305 gives RFC 8439's test vector 2.5.2."""
        key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
        tag = poly1305(key, b"Cryptographic Forum Research Group")
        self.assertEqual(tag.hex(), "a8061dc1305136c6c22b8baf0c0127a9")

    def test_gcm_mcgrew_viega_cases_1_and_2(self) -> None:
        """The reference AES-GCM gives McGrew and Viega's test cases 1 and 2."""
        zero = bytes(16)
        self.assertEqual(
            gcm_reference(zero, bytes(12), b"", b"").hex(), "58e2fccefa7e3061367f1d57a4e7455a"
        )
        self.assertEqual(
            gcm_reference(zero, bytes(12), zero, b"").hex(),
            "0388dace60b6a392f328c2b971b2fe78ab6e47d42cec13bdf53a67b21257bddf",
        )


# -- known-answer tests of the framing --------------------------------------------------

KEY64 = bytes(range(0x40, 0x80))
IV16 = bytes.fromhex("00112233445566778899aabbccddeeff")
MKEY = bytes(range(0x80, 0xC0))
PAYLOAD = b"\x5e" + b"channel data: hello, world" * 3  # type 94 + payload


def _feed_bytewise(opener: Opener, wire: bytes, seq: int) -> bytes:
    """Deliver ``wire`` one byte at a time; the packet must appear exactly at the end."""
    for n in range(len(wire)):
        self_check = opener.open(wire[:n], 0, seq)
        assert self_check is None, f"packet complete after {n} of {len(wire)} bytes"
    result = opener.open(wire, 0, seq)
    assert result is not None and result[1] == len(wire)
    return result[0]


class ChachaKnownAnswerTests(unittest.TestCase):
    """PROTOCOL.chacha20poly1305: K_2 || K_1, length under K_1, poly key from block 0."""

    def expected(self, seq: int, payload: bytes) -> bytes:
        k2, k1 = KEY64[:32], KEY64[32:]
        nonce = struct.pack(">Q", seq)
        n = 5 + len(payload)
        pad = 8 - ((n - 4) % 8)
        if pad < 4:
            pad += 8
        plain_len = struct.pack(">L", n + pad - 4)
        body = bytes([pad]) + payload + fixed_pad(pad)
        enc_len = chacha_djb(k1, nonce, 0, plain_len)
        polykey = chacha_djb(k2, nonce, 0, bytes(32))
        enc_body = chacha_djb(k2, nonce, 1, body)
        return enc_len + enc_body + poly1305(polykey, enc_len + enc_body)

    def sealer(self) -> ChachaSealer:
        s = ChachaSealer(CIPHERS[b"chacha20-poly1305@openssh.com"], KEY64)
        s.random = fixed_pad  # type: ignore[method-assign]
        return s

    def test_seal_matches_spec(self) -> None:
        """Sealed chacha20-poly1305 packets equal the reference construction, sequence numbers up
        to 2^32-1 included."""
        s = self.sealer()
        for seq in (0, 1, 7, M32):
            wire = s.seal(seq, PAYLOAD[0], PAYLOAD[1:])
            self.assertEqual(wire.hex(), self.expected(seq, PAYLOAD).hex(), f"seq {seq}")
            self.assertEqual((len(wire) - 4 - 16) % 8, 0)

    def test_open_and_reject(self) -> None:
        """A sealed packet opens even fed byte by byte; a wrong sequence number or any flipped bit
        is rejected."""
        wire = self.expected(5, PAYLOAD)
        opener = ChachaOpener(CIPHERS[b"chacha20-poly1305@openssh.com"], KEY64)
        self.assertEqual(_feed_bytewise(opener, wire, 5), PAYLOAD)
        exc = self.assertRaises(PacketError, opener.open, wire, 0, 6)  # wrong sequence number
        self.assertIn(exc.code, (crypto.DISCONNECT_MAC_ERROR, crypto.DISCONNECT_PROTOCOL_ERROR))
        for i in (0, 4, len(wire) - 1):
            bad = bytearray(wire)
            bad[i] ^= 1
            self.assertRaises(PacketError, opener.open, bytes(bad), 0, 5)


class GcmKnownAnswerTests(unittest.TestCase):
    """RFC 5647 as amended: length in clear as AAD, nonce = fixed(4) || counter(8), +1 a packet."""

    def expected(self, key: bytes, iv: bytes, payload: bytes) -> bytes:
        n = 5 + len(payload)
        pad = 16 - ((n - 4) % 16)
        if pad < 4:
            pad += 16
        length = struct.pack(">L", n + pad - 4)
        return length + gcm_reference(key, iv, bytes([pad]) + payload + fixed_pad(pad), length)

    def test_seal_matches_spec_and_nonce_advances(self) -> None:
        """Sealed AES-GCM packets equal the reference, and the invocation counter advances per
        packet, wrapping as RFC 5647 says."""
        for name in (b"aes128-gcm@openssh.com", b"aes256-gcm@openssh.com"):
            spec = CIPHERS[name]
            key = KEY64[: spec.key_size]
            iv = bytes.fromhex("cafebabe fffffffffffffffe".replace(" ", ""))
            s = GcmSealer(spec, KEY64, iv + b"trailing")
            s.random = fixed_pad  # type: ignore[method-assign]
            nonces = [
                iv,
                iv[:4] + b"\xff" * 8,
                iv[:4] + bytes(8),  # the 64-bit invocation counter wraps
            ]
            for nonce in nonces:
                wire = s.seal(123, PAYLOAD[0], PAYLOAD[1:])
                self.assertEqual(wire.hex(), self.expected(key, nonce, PAYLOAD).hex())
                self.assertEqual((len(wire) - 4 - 16) % 16, 0)
                # and cryptography's AESGCM agrees with the reference
                self.assertEqual(
                    wire[4:], AESGCM(key).encrypt(nonce, gcm_plain(wire, key, nonce), wire[:4])
                )

    def test_open_and_reject(self) -> None:
        """A sealed packet opens even fed byte by byte; a wrong sequence number or any flipped bit
        is rejected."""
        spec = CIPHERS[b"aes256-gcm@openssh.com"]
        iv = bytes(range(12))
        wire = self.expected(KEY64[:32], iv, PAYLOAD)
        opener = GcmOpener(spec, KEY64, iv)
        self.assertEqual(_feed_bytewise(opener, wire, 0), PAYLOAD)
        # a replay under the next nonce fails
        opener2 = GcmOpener(spec, KEY64, iv)
        opener2.open(wire, 0, 0)
        exc = self.assertRaises(PacketError, opener2.open, wire, 0, 1)
        self.assertEqual(exc.code, crypto.DISCONNECT_MAC_ERROR)
        bad = bytearray(wire + bytes(32))
        bad[3] ^= 0x10  # the length is authenticated
        exc = self.assertRaises(PacketError, GcmOpener(spec, KEY64, iv).open, bytes(bad), 0, 0)
        self.assertEqual(exc.code, crypto.DISCONNECT_MAC_ERROR)


def gcm_plain(wire: bytes, key: bytes, nonce: bytes) -> bytes:
    return AESGCM(key).decrypt(nonce, wire[4:], wire[:4])


class CtrKnownAnswerTests(unittest.TestCase):
    """RFC 4253 encrypt-and-MAC, and OpenSSH's encrypt-then-MAC (length in clear)."""

    def expected(self, mac: bytes, seqs: list[int]) -> bytes:
        spec = MACS[mac]
        digest = hashlib.sha256 if spec.key_size == 32 else hashlib.sha512
        mkey = MKEY[: spec.key_size]
        out = b""
        offset = 0
        for seq in seqs:
            n = 5 + len(PAYLOAD)
            aad = 4 if spec.etm else 0
            pad = 16 - ((n - aad) % 16)
            if pad < 4:
                pad += 16
            length = struct.pack(">L", n + pad - 4)
            body = bytes([pad]) + PAYLOAD + fixed_pad(pad)
            if spec.etm:
                enc = ctr_reference(KEY64[:16], IV16, offset, body)
                offset += len(body) // 16
                tag = std_hmac.new(mkey, struct.pack(">L", seq) + length + enc, digest).digest()
                out += length + enc + tag
            else:
                plain = length + body
                enc = ctr_reference(KEY64[:16], IV16, offset, plain)
                offset += len(plain) // 16
                tag = std_hmac.new(mkey, struct.pack(">L", seq) + plain, digest).digest()
                out += enc + tag
        return out

    def test_seal_open_each_mac(self) -> None:
        """aes128-ctr packets sealed with each MAC equal the reference and open again, also when
        split mid-packet."""
        spec = CIPHERS[b"aes128-ctr"]
        for mac in MACS:
            s = CtrSealer(spec, MACS[mac], KEY64, IV16, MKEY)
            s.random = fixed_pad  # type: ignore[method-assign]
            wire = b"".join(s.seal(seq, PAYLOAD[0], PAYLOAD[1:]) for seq in (9, 10))
            self.assertEqual(wire.hex(), self.expected(mac, [9, 10]).hex(), mac)
            opener = CtrOpener(spec, MACS[mac], KEY64, IV16, MKEY)
            first = opener.open(wire, 0, 9)
            assert first is not None
            self.assertEqual(first[0], PAYLOAD)
            half = len(wire) - (len(wire) - first[1]) // 2
            self.assertIsNone(opener.open(wire[:half], first[1], 10))  # partial, state kept
            second = opener.open(wire, first[1], 10)
            assert second is not None
            self.assertEqual(second, (PAYLOAD, len(wire)))

    def test_reject_tampering_and_wrong_sequence(self) -> None:
        """aes256-ctr packets with any MAC are rejected with a MAC error under a wrong sequence
        number or after tampering."""
        spec = CIPHERS[b"aes256-ctr"]
        for mac in MACS:
            s = CtrSealer(spec, MACS[mac], KEY64, IV16, MKEY)
            wire = s.seal(0, PAYLOAD[0], PAYLOAD[1:])
            opener = CtrOpener(spec, MACS[mac], KEY64, IV16, MKEY)
            exc = self.assertRaises(PacketError, opener.open, wire, 0, 1)
            self.assertEqual(exc.code, crypto.DISCONNECT_MAC_ERROR)
            bad = bytearray(wire)
            bad[20] ^= 1
            opener = CtrOpener(spec, MACS[mac], KEY64, IV16, MKEY)
            self.assertRaises(PacketError, opener.open, bytes(bad), 0, 0)


class FramingTests(unittest.TestCase):
    def test_padding_rules(self) -> None:
        """At least 4 bytes of padding; the encrypted part fills whole blocks."""
        modes_ = [
            (Sealer(), 8, 0, 0),
            (GcmSealer(CIPHERS[b"aes128-gcm@openssh.com"], KEY64, bytes(12)), 16, 4, 16),
            (ChachaSealer(CIPHERS[b"chacha20-poly1305@openssh.com"], KEY64), 8, 4, 16),
        ]
        for mac in MACS:
            spec = MACS[mac]
            modes_.append(
                (
                    CtrSealer(CIPHERS[b"aes128-ctr"], spec, KEY64, IV16, MKEY),
                    16,
                    4 if spec.etm else 0,
                    spec.hash.digest_size,
                )
            )
        for sealer, block, aad, tag in modes_:
            for size in range(0, 70):
                wire = sealer.seal(0, 2, bytes(size))
                body = len(wire) - tag - aad
                self.assertEqual(body % block, 0, (sealer, size))
                pad = body - (4 - aad) - 1 - 1 - size
                self.assertGreaterEqual(pad, 4)
                self.assertLess(pad, 4 + block)

    def test_bad_lengths_rejected(self) -> None:
        """Packet lengths that are too short, unaligned or too long, and padding past the payload,
        are rejected."""
        none = Opener()
        for length in (0, 4, 8 + 3, crypto.MAX_PACKET + 4):
            self.assertRaises(PacketError, none.open, struct.pack(">L", length) + bytes(16), 0, 0)
        # padding length pointing past the payload
        self.assertRaises(PacketError, none.open, struct.pack(">LB", 12, 11) + bytes(11), 0, 0)

    def test_parse_algorithms(self) -> None:
        """OpenSSH-style algorithm lists: plain, +, - and ^ forms give the expected order; unknown
        names and empty lists are refused."""
        p = crypto.parse_algorithms
        self.assertEqual(p("ciphers", "aes256-ctr, aes128-gcm@openssh.com"),
                         (b"aes256-ctr", b"aes128-gcm@openssh.com"))  # fmt: skip
        self.assertEqual(p("ciphers", "-chacha20-poly1305@openssh.com")[0], b"aes128-ctr")
        self.assertEqual(p("macs", "^hmac-sha2-512")[:2], (b"hmac-sha2-512", b"hmac-sha2-256-etm@openssh.com"))  # fmt: skip # noqa: E501
        self.assertEqual(p("ciphers", "+aes128-ctr"), crypto.DEFAULT_CIPHERS)
        self.assertIn(b"curve25519-sha256", p("kex_algorithms", "curve25519-sha256"))
        for kind, bad in (("ciphers", "aes128-cbc"), ("macs", "hmac-sha1"),
                          ("kex_algorithms", "diffie-hellman-group1-sha1"), ("ciphers", " , ")):  # fmt: skip # noqa: E501
            self.assertRaises(ValueError, p, kind, bad)

    def test_unsupported_name_is_a_config_error(self) -> None:
        """An unsupported cipher in nuttssh.ini is a ConfigError naming the key and the cipher."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("[server]\nciphers = aes128-ctr,3des-cbc\n")
        exc = self.assertRaises(config.ConfigError, config.load, path)
        self.assertIn("ciphers", str(exc))
        self.assertIn("3des-cbc", str(exc))

    def test_defaults_agree(self) -> None:
        """transport.py's defaults, crypto.py's and the nuttssh.ini defaults are one list."""
        from nuttconch import transport

        offered = transport.SwitchboardTransport
        self.assertEqual(tuple(offered.supportedCiphers), crypto.DEFAULT_CIPHERS)
        self.assertEqual(tuple(offered.supportedMACs), crypto.DEFAULT_MACS)
        settings = {s.key: s for s in config.SCHEMA}
        self.assertEqual(
            settings["ciphers"].parse(settings["ciphers"].default), crypto.DEFAULT_CIPHERS
        )  # noqa: E501
        self.assertEqual(settings["macs"].parse(settings["macs"].default), crypto.DEFAULT_MACS)
        self.assertEqual(
            settings["kex_algorithms"].parse(settings["kex_algorithms"].default),
            tuple(offered.supportedKeyExchanges),
        )


# -- a hand-rolled client for strict KEX and Terrapin -----------------------------------


class Closed(Exception):
    pass


class RawClient:
    """A blocking SSH client (curve25519-sha256, ssh-ed25519) that can misbehave on purpose."""

    def __init__(self, port: int, cipher: bytes, mac: bytes, strict: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.cipher, self.mac, self.strict = cipher, mac, strict
        self.buf = b""
        self.sealer: Sealer = Sealer()
        self.opener: Opener = Opener()
        self.seq_out = 0
        self.seq_in = 0
        self.received: list[tuple[int, bytes]] = []

    def send(self, msg: int, payload: bytes = b"", *, drop: bool = False) -> None:
        wire = self.sealer.seal(self.seq_out, msg, payload)
        self.seq_out = (self.seq_out + 1) & M32
        if not drop:  # a man in the middle deletes it
            try:
                self.sock.sendall(wire)
            except OSError:
                pass  # the server hung up already; recv() reports how

    def inject(self, msg: int, payload: bytes) -> None:
        """A man in the middle adds a plaintext packet; the client's counters do not move."""
        self.sock.sendall(Sealer().seal(0, msg, payload))

    def recv(self) -> tuple[int, bytes]:
        while True:
            result = self.opener.open(self.buf, 0, self.seq_in)
            if result is not None:
                payload, end = result
                self.buf = self.buf[end:]
                self.seq_in = (self.seq_in + 1) & M32
                self.received.append((payload[0], payload[1:]))
                return payload[0], payload[1:]
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                raise Closed()
            self.buf += chunk

    def expect(self, msg: int) -> bytes:
        got, payload = self.recv()
        while got == 2:  # skip IGNORE
            got, payload = self.recv()
        if got == 1:
            raise Closed(getNS(payload[4:])[0].decode())
        assert got == msg, f"expected message {msg}, got {got}"
        return payload

    def handshake(
        self,
        ignore_first: bool = False,
        ignore_before_newkeys: bool = False,
        own_ignore: bool = False,
    ) -> None:
        v_c = b"SSH-2.0-nuttconch_test_1.0"
        self.sock.sendall(v_c + b"\r\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Closed("closed before the version line")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        v_s = line.rstrip(b"\r")
        kex = b"curve25519-sha256,ext-info-c" + (
            b",kex-strict-c-v00@openssh.com" if self.strict else b""
        )  # noqa: E501
        i_c = b"".join(
            [bytes([20]), os.urandom(16), NS(kex), NS(b"ssh-ed25519"), NS(self.cipher),
             NS(self.cipher), NS(self.mac), NS(self.mac), NS(b"none"), NS(b"none"),
             NS(b""), NS(b""), b"\0\0\0\0\0"]
        )  # fmt: skip
        if ignore_first:
            self.inject(2, NS(b"hello"))
        self.send(20, i_c[1:])
        i_s = bytes([20]) + self.expect(20)
        priv = X25519PrivateKey.generate()
        q_c = priv.public_key().public_bytes_raw()
        self.send(30, NS(q_c))
        reply = self.expect(31)
        k_s, rest = getNS(reply)
        q_s, rest = getNS(rest)
        shared = MP(int.from_bytes(priv.exchange(X25519PrivateKeyPublic(q_s)), "big"))
        h = hashlib.sha256(
            NS(v_c) + NS(v_s) + NS(i_c) + NS(i_s) + NS(k_s) + NS(q_c) + NS(q_s) + shared
        ).digest()

        def key(letter: bytes) -> bytes:
            k = hashlib.sha256(shared + h + letter + h).digest()
            while len(k) < 64:
                k += hashlib.sha256(shared + h + k).digest()
            return k

        self.expect(21)
        self.opener = crypto.make_opener(self.cipher, self.mac, key(b"D"), key(b"B"), key(b"F"))
        if self.strict:
            self.seq_in = 0
        if ignore_before_newkeys:
            self.inject(2, NS(b"terrapin"))
        if own_ignore:  # sent by the client itself: counted on both sides
            self.send(2, NS(b"keepalive"))
        self.send(21)
        self.sealer = crypto.make_sealer(self.cipher, self.mac, key(b"C"), key(b"A"), key(b"E"))
        if self.strict:
            self.seq_out = 0

    def service_request(self) -> bytes:
        self.send(5, NS(b"ssh-userauth"))
        got, payload = self.recv()
        if got == 7:  # EXT_INFO comes first
            got, payload = self.recv()
        if got == 1:
            raise Closed(getNS(payload[4:])[0].decode())
        assert got == 6, got
        return getNS(payload)[0]

    def close(self) -> None:
        self.sock.close()


def X25519PrivateKeyPublic(raw: bytes):  # noqa: N802
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(raw)


ALL_MODES = [
    (b"chacha20-poly1305@openssh.com", b"hmac-sha2-256"),
    (b"aes128-gcm@openssh.com", b"hmac-sha2-256"),
    (b"aes256-gcm@openssh.com", b"hmac-sha2-256"),
    (b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com"),
    (b"aes256-ctr", b"hmac-sha2-512-etm@openssh.com"),
    (b"aes192-ctr", b"hmac-sha2-256"),
    (b"aes128-ctr", b"hmac-sha2-512"),
]


class StrictKexTests(SwitchboardTestMixin, unittest.TestCase):
    """Strict KEX (OpenSSH PROTOCOL 1.10) and Terrapin, against a client we control."""

    def setUp(self) -> object:
        # Record why the server disconnected: the client may see a reset, not the DISCONNECT.
        self.reasons: list[str] = []
        original = SwitchboardTransport.sendDisconnect

        def record(transport: SwitchboardTransport, reason: int, desc: bytes) -> None:
            self.reasons.append(desc.decode("ascii", "replace"))
            original(transport, reason, desc)

        self.patch(SwitchboardTransport, "sendDisconnect", record)
        return super().setUp()

    def run_client(self, cipher: bytes, mac: bytes, strict: bool, script) -> object:
        def go() -> object:
            client = RawClient(self.port, cipher, mac, strict)
            try:
                return script(client)
            except Closed as exc:
                return ("closed", str(exc))
            finally:
                client.close()

        return threads.deferToThread(go)

    @defer.inlineCallbacks
    def test_every_mode_strict_and_not(self) -> defer.Generator:
        """The client reaches ssh-userauth with each mode; under strict KEX the server's
        sequence numbers restart at zero (the client's opener expects that)."""

        def script(c: RawClient) -> object:
            c.handshake()
            return c.service_request()

        for cipher, mac in ALL_MODES:  # one at a time: MaxStartups would refuse a crowd
            for strict in (True, False):
                got = yield self.run_client(cipher, mac, strict, script)
                self.assertEqual(got, b"ssh-userauth", (cipher, strict))

    def test_ignore_before_newkeys_disconnects(self) -> object:
        """Strict: an IGNORE injected before NEWKEYS ends the connection."""

        def script(c: RawClient) -> object:
            c.handshake(ignore_before_newkeys=True)
            return c.service_request()

        d = self.run_client(b"chacha20-poly1305@openssh.com", b"none", True, script)
        d.addCallback(self.assertClosed, "strict KEX violation: unexpected message 2")
        return d

    def test_ignore_before_kexinit_disconnects(self) -> object:
        """Strict: KEXINIT must be the client's first packet."""

        def script(c: RawClient) -> object:
            c.handshake(ignore_first=True)
            return c.service_request()

        d = self.run_client(b"aes128-gcm@openssh.com", b"none", True, script)
        d.addCallback(self.assertClosed, "KEXINIT was not the first packet")
        return d

    def test_not_strict_ignore_is_tolerated(self) -> object:
        """Without kex-strict-c the old rules apply: IGNORE during KEX is harmless."""

        def script(c: RawClient) -> object:
            c.handshake(own_ignore=True)
            return c.service_request()

        d = self.run_client(b"chacha20-poly1305@openssh.com", b"none", False, script)
        d.addCallback(self.assertEqual, b"ssh-userauth")
        return d

    def terrapin(self, c: RawClient) -> object:
        """The attack: inject IGNORE before NEWKEYS (+1 to the server's receive sequence),
        then delete the client's first encrypted packet; the next one lines up again."""
        c.handshake(ignore_before_newkeys=True)
        c.send(2, NS(b"first packet, deleted in flight"), drop=True)
        return c.service_request()

    @defer.inlineCallbacks
    def test_terrapin_truncation_fails_with_strict_kex(self) -> defer.Generator:
        """The Terrapin prefix truncation (an injected IGNORE, the first encrypted packet deleted)
        ends the connection under strict KEX, with every mode."""
        for cipher, mac in ALL_MODES:
            result = yield self.run_client(cipher, mac, True, self.terrapin)
            self.assertClosed(result, "strict KEX violation")

    @defer.inlineCallbacks
    def test_truncation_alone_fails_with_strict_kex(self) -> defer.Generator:
        """Even without the injection, deleting the first encrypted packet breaks the MAC:
        sequence numbers restarted at zero on both sides."""

        def script(c: RawClient) -> object:
            c.handshake()
            c.send(2, NS(b"deleted"), drop=True)
            return c.service_request()

        for cipher, mac in ALL_MODES:
            result = yield self.run_client(cipher, mac, True, script)
            # AEAD and EtM: the MAC; CTR encrypt-and-MAC: the keystream moved on as well
            self.assertClosed(result, "bad MAC", "bad packet length")

    def test_terrapin_control_without_strict_kex(self) -> object:
        """Control: without strict KEX the same truncation goes unnoticed (the attack model
        is real), which is why every OpenSSH 9 client offers kex-strict-c."""
        d = self.run_client(b"chacha20-poly1305@openssh.com", b"none", False, self.terrapin)
        d.addCallback(self.assertEqual, b"ssh-userauth")
        return d

    def assertClosed(self, result: object, *why: str) -> None:
        self.assertIsInstance(result, tuple, f"not disconnected: {result!r}")
        assert isinstance(result, tuple)
        self.assertEqual(result[0], "closed")
        seen = [result[1], *self.reasons]
        self.assertTrue(
            any(w in text for w in why for text in seen), f"{seen!r}: none is one of {why}"
        )


class PiecesTests(unittest.TestCase):
    """The bulk path: seal_pieces (CHANNEL_DATA from a head and a view) is seal's wire,
    and open_raw reads a bytearray receive buffer without copying the payload out."""

    def pairs(self):
        for cipher in CIPHERS:
            for mac in MACS if not CIPHERS[cipher].aead else [crypto.IMPLICIT_MAC]:
                make = crypto.make_sealer
                yield (
                    f"{cipher.decode()} {mac.decode()}",
                    make(cipher, mac, KEY64, IV16, MKEY),
                    make(cipher, mac, KEY64, IV16, MKEY),
                    crypto.make_opener(cipher, mac, KEY64, IV16, MKEY),
                )

    def test_pieces_equal_seal(self) -> None:
        """Sealing channel data from pieces gives the same wire bytes as sealing the joined packet,
        for every cipher."""
        data = os.urandom(1000)
        for name, a, b, opener in self.pairs():
            a.random = b.random = fixed_pad  # type: ignore[method-assign]
            for seq, size in ((0, 0), (1, 1), (2, 17), (M32, 1000)):
                head = struct.pack(">BLL", 94, 7, size)
                pieces = a.seal_pieces(seq, head, memoryview(data)[:size])
                self.assertTrue(all(type(p) is bytes for p in pieces), name)
                wire = b"".join(pieces)
                self.assertEqual(wire, b.seal(seq, 94, head[1:] + data[:size]), f"{name} {size}")
                buf = bytearray(b"junk" + wire + b"next")
                (plain, first, last), end = opener.open_raw(buf, 4, seq)
                self.assertEqual(end, 4 + len(wire), name)
                self.assertEqual(bytes(plain[first:last]), head + data[:size], name)

    def test_padding_pool_never_repeats(self) -> None:
        """Padding is drawn from os.urandom in blocks; no byte is handed out twice."""
        blocks = iter(bytes(range(k, k + 64)) for k in range(0, 192, 64))
        self.patch(crypto.os, "urandom", lambda n: next(blocks)[:n])
        pool = crypto._RandomPool(64)
        draws = [pool(n) for n in (4, 19, 30, 11, 64, 5)]
        self.assertEqual(b"".join(draws), bytes(range(133)))


class ReadPauseTests(unittest.TestCase):
    """Reading stops while any reason holds it, and resumes only when none is left."""

    def test_reasons_overlap(self) -> None:
        """Two reasons pause once; reading resumes once, when the last one is gone."""
        calls: list[str] = []

        class TCP:
            def pauseProducing(self) -> None:
                calls.append("pause")

            def resumeProducing(self) -> None:
                calls.append("resume")

        transport = SwitchboardTransport()
        transport.transport = TCP()
        transport.pauseReading("kex queue")
        transport.pauseReading("replies unread")
        transport.pauseReading("kex queue")
        transport.resumeReading("kex queue")
        self.assertEqual(calls, ["pause"])
        transport.resumeReading("replies unread")
        transport.resumeReading("replies unread")
        self.assertEqual(calls, ["pause", "resume"])
