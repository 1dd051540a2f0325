# -*- test-case-name: tests.test_crypto -*-
"""Packet protection on OpenSSH 9's terms: strict KEX, AES-GCM, ChaCha20-Poly1305, EtM.

Conch's ``SSHCiphers`` only knows encrypt-and-MAC with CBC/CTR, and its
transport neither resets sequence numbers nor polices the initial key
exchange (Terrapin, CVE-2023-48795).  This module replaces the packet layer:

* ``Sealer``/``Opener`` objects frame, pad, encrypt and authenticate one
  direction of the binary packet protocol for each supported mode:

  - ``aes*-ctr`` with ``hmac-sha2-*`` (RFC 4253: MAC over seq || plaintext);
  - ``aes*-ctr`` with ``hmac-sha2-*-etm@openssh.com`` (OpenSSH PROTOCOL 1.7:
    length in clear, MAC over seq || length || ciphertext);
  - ``aes{128,256}-gcm@openssh.com`` (RFC 5647 as amended by OpenSSH PROTOCOL
    1.6: the length is additional authenticated data, not encrypted);
  - ``chacha20-poly1305@openssh.com`` (PROTOCOL.chacha20poly1305).

  Every primitive comes from ``cryptography``; only the SSH framing is here.

* ``ModernTransportMixin`` puts them under a Conch ``SSHServerTransport``:
  its own KEXINIT negotiation (AEAD ciphers imply their MAC), strict KEX
  (OpenSSH PROTOCOL 1.10), sequence-number reset after NEWKEYS, outgoing
  keys switched right after our NEWKEYS and incoming ones on the peer's,
  and server-side rekeying after a byte limit like OpenSSH's RekeyLimit.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.conch.ssh import transport as conch_transport
from twisted.conch.ssh.common import NS, getNS

MSG_KEXINIT = 20
MSG_NEWKEYS = 21
DISCONNECT_PROTOCOL_ERROR = conch_transport.DISCONNECT_PROTOCOL_ERROR
DISCONNECT_MAC_ERROR = conch_transport.DISCONNECT_MAC_ERROR
DISCONNECT_KEY_EXCHANGE_FAILED = conch_transport.DISCONNECT_KEY_EXCHANGE_FAILED

KEX_STRICT_C = b"kex-strict-c-v00@openssh.com"
KEX_STRICT_S = b"kex-strict-s-v00@openssh.com"
EXT_INFO_C = b"ext-info-c"
EXT_INFO_S = b"ext-info-s"
PSEUDO_KEX = frozenset({KEX_STRICT_C, KEX_STRICT_S, EXT_INFO_C, EXT_INFO_S})
IMPLICIT_MAC = b"<implicit>"

#: OpenSSH's PACKET_MAX_SIZE: the largest packet_length accepted.
MAX_PACKET = 256 * 1024
_SEQ_MASK = 0xFFFFFFFF
# What one queued (type, payload) tuple costs beyond its payload, so that a flood of empty
# replies counts too.
_QUEUE_ENTRY_COST = 64
_ZERO_BLOCK = bytes(64)
_pack_len = struct.Struct(">L").pack
_pack_hdr = struct.Struct(">LBB").pack
_pack_body = struct.Struct(">BB").pack
_unpack_len = struct.Struct(">L").unpack_from
_pack_lenpad = struct.Struct(">LB").pack
_pack_byte = struct.Struct(">B").pack
_pack_data_head = struct.Struct(">BLL").pack
MSG_CHANNEL_DATA = 94


@dataclass(frozen=True)
class CipherSpec:
    kind: str  # "ctr", "gcm", "chacha", "none"
    key_size: int
    iv_size: int
    block_size: int  # for padding, as OpenSSH uses it

    @property
    def aead(self) -> bool:
        return self.kind in ("gcm", "chacha")

    @property
    def rekey_bytes(self) -> int:
        """OpenSSH's default rekey volume: 2**(bs*2) blocks for 16-byte blocks, else 1 GiB."""
        if self.block_size >= 16:
            return (1 << (self.block_size * 2)) * self.block_size
        return 1 << 30


@dataclass(frozen=True)
class MacSpec:
    hash: type[hashes.HashAlgorithm]
    key_size: int
    etm: bool


CIPHERS: dict[bytes, CipherSpec] = {
    b"chacha20-poly1305@openssh.com": CipherSpec("chacha", 64, 0, 8),
    b"aes128-ctr": CipherSpec("ctr", 16, 16, 16),
    b"aes192-ctr": CipherSpec("ctr", 24, 16, 16),
    b"aes256-ctr": CipherSpec("ctr", 32, 16, 16),
    b"aes128-gcm@openssh.com": CipherSpec("gcm", 16, 12, 16),
    b"aes256-gcm@openssh.com": CipherSpec("gcm", 32, 12, 16),
}
MACS: dict[bytes, MacSpec] = {
    b"hmac-sha2-256-etm@openssh.com": MacSpec(hashes.SHA256, 32, True),
    b"hmac-sha2-512-etm@openssh.com": MacSpec(hashes.SHA512, 64, True),
    b"hmac-sha2-256": MacSpec(hashes.SHA256, 32, False),
    b"hmac-sha2-512": MacSpec(hashes.SHA512, 64, False),
}
_NONE_CIPHER = CipherSpec("none", 0, 0, 8)

# The names, defaults and list parsing live in algorithms.py (config.py uses them
# without importing this module); CIPHERS and MACS implement exactly those names.
from .algorithms import (  # noqa: E402  (re-exported for transport.py and tests)
    DEFAULT_CIPHERS as DEFAULT_CIPHERS,
)
from .algorithms import DEFAULT_KEX as DEFAULT_KEX  # noqa: E402
from .algorithms import DEFAULT_MACS as DEFAULT_MACS  # noqa: E402
from .algorithms import KNOWN_KEX as KNOWN_KEX  # noqa: E402
from .algorithms import available_kex as available_kex  # noqa: E402
from .algorithms import parse_algorithms as parse_algorithms  # noqa: E402


class PacketError(Exception):
    """A corrupt or forged packet: the connection must be dropped."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _padlen(n: int, block: int, aad: int) -> int:
    """OpenSSH's rule: pad (packet minus any unencrypted length) to the block, at least 4."""
    pad = block - ((n - aad) % block)
    if pad < 4:
        pad += block
    return pad


def _check_len(packlen: int, block: int, aad: int) -> None:
    if packlen < 5 or packlen > MAX_PACKET:
        raise PacketError(DISCONNECT_PROTOCOL_ERROR, f"bad packet length {packlen}")
    if (packlen + 4 - aad) % block:
        raise PacketError(DISCONNECT_PROTOCOL_ERROR, f"bad packet length {packlen} mod {block}")


def _bounds(plain: Any, start: int, end: int) -> tuple[Any, int, int]:
    """(plain, first, last): the payload of a decrypted [padlen|payload|padding] spanning
    plain[start:end] is plain[first:last]; nothing is copied."""
    padlen = plain[start]
    if padlen < 4 or end - start - 1 - padlen < 1:
        raise PacketError(DISCONNECT_PROTOCOL_ERROR, f"bad padding length {padlen}")
    return plain, start + 1, end - padlen


def _payload(plain: Any, start: int, end: int) -> bytes:
    """The payload of a decrypted [padlen|payload|padding] spanning plain[start:end]."""
    _, first, last = _bounds(plain, start, end)
    return bytes(plain[first:last])


class _RandomPool:
    """Padding bytes from os.urandom, fetched 4 KiB at a time instead of one
    getrandom() system call per packet (OpenSSH likewise draws padding from a
    buffered arc4random stream)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._pool = b""
        self._pos = 0

    def __call__(self, n: int) -> bytes:
        pos = self._pos
        if pos + n > len(self._pool):
            self._pool = os.urandom(max(self._size, n))
            pos = 0
        self._pos = pos + n
        return self._pool[pos : pos + n]


_padding = _RandomPool()


# -- sealers (outgoing) ------------------------------------------------------------------


class Sealer:
    """Turns (sequence number, message type, payload) into wire bytes."""

    spec = _NONE_CIPHER
    aad = 0
    random = staticmethod(_padding)

    def seal(self, seq: int, msg: int, payload: bytes) -> bytes:
        bs = self.spec.block_size
        n = 6 + len(payload)
        pad = _padlen(n, bs, 0)
        return b"".join((_pack_hdr(n + pad - 4, pad, msg), payload, self.random(pad)))

    def seal_pieces(self, seq: int, head: bytes, data: Any) -> list[bytes]:
        """Wire bytes of the message ``head + data`` (``head`` starts with the message
        type), as a list for ``writeSequence``; ``data`` may be a memoryview.  Modes
        that can work on pieces avoid joining ``data`` into a new payload."""
        return [self.seal(seq, head[0], head[1:] + bytes(data))]


class CtrSealer(Sealer):
    def __init__(self, spec: CipherSpec, mac: MacSpec, key: bytes, iv: bytes, mkey: bytes):
        self.spec = spec
        self.etm = mac.etm
        self.aad = 4 if mac.etm else 0
        self._enc = Cipher(algorithms.AES(key[: spec.key_size]), modes.CTR(iv[:16])).encryptor()
        self._mac = hmac.HMAC(mkey[: mac.key_size], mac.hash())

    def seal(self, seq: int, msg: int, payload: bytes) -> bytes:
        n = 6 + len(payload)
        pad = _padlen(n, 16, self.aad)
        packlen = n + pad - 4
        h = self._mac.copy()
        h.update(_pack_len(seq))
        if self.etm:
            header = _pack_len(packlen)
            body = self._enc.update(b"".join((_pack_body(pad, msg), payload, self.random(pad))))
            h.update(header)
            h.update(body)
            return b"".join((header, body, h.finalize()))
        plain = b"".join((_pack_hdr(packlen, pad, msg), payload, self.random(pad)))
        h.update(plain)
        return b"".join((self._enc.update(plain), h.finalize()))

    def seal_pieces(self, seq: int, head: bytes, data: Any) -> list[bytes]:
        """CTR is a stream cipher and HMAC is incremental: encrypt and MAC the pieces."""
        n = 5 + len(head) + len(data)
        pad = _padlen(n, 16, self.aad)
        packlen = n + pad - 4
        enc = self._enc.update
        h = self._mac.copy()
        h.update(_pack_len(seq))
        padding = self.random(pad)
        if self.etm:
            length = _pack_len(packlen)
            first = enc(_pack_byte(pad) + head)
            body = enc(data)
            tail = enc(padding)
            h.update(length)
            h.update(first)
            h.update(body)
            h.update(tail)
            return [length + first, body, tail + h.finalize()]
        first = _pack_lenpad(packlen, pad) + head
        h.update(first)
        h.update(data)
        h.update(padding)
        return [enc(first), enc(data), enc(padding) + h.finalize()]


class GcmSealer(Sealer):
    aad = 4

    def __init__(self, spec: CipherSpec, key: bytes, iv: bytes):
        self.spec = spec
        self._aead = AESGCM(key[: spec.key_size])
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:12], "big")

    def seal(self, seq: int, msg: int, payload: bytes) -> bytes:
        n = 6 + len(payload)
        pad = _padlen(n, 16, 4)
        header = _pack_len(n + pad - 4)
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        self._counter = (self._counter + 1) & 0xFFFFFFFFFFFFFFFF
        body = b"".join((_pack_body(pad, msg), payload, self.random(pad)))
        return header + self._aead.encrypt(nonce, body, header)


def _chacha_nonce(seq: int, counter: int = 0) -> bytes:
    """cryptography's 16-byte ChaCha20 nonce: little-endian block counter, then the
    64-bit big-endian sequence number (the original, 64-bit-nonce ChaCha20 layout)."""
    return counter.to_bytes(8, "little") + seq.to_bytes(8, "big")


class ChachaSealer(Sealer):
    aad = 4

    def __init__(self, spec: CipherSpec, key: bytes):
        self.spec = spec
        self._main = algorithms.ChaCha20  # K_2: first 32 bytes; K_1: the next 32
        self._k2 = key[:32]
        self._k1 = key[32:64]

    def seal(self, seq: int, msg: int, payload: bytes) -> bytes:
        n = 6 + len(payload)
        pad = _padlen(n, 8, 4)
        nonce = _chacha_nonce(seq)
        header = (
            Cipher(self._main(self._k1, nonce), None).encryptor().update(_pack_len(n + pad - 4))
        )
        stream = Cipher(self._main(self._k2, nonce), None).encryptor()
        polykey = stream.update(_ZERO_BLOCK)[:32]
        body = stream.update(b"".join((_pack_body(pad, msg), payload, self.random(pad))))
        wire = header + body
        return wire + Poly1305.generate_tag(polykey, wire)


# -- openers (incoming) ------------------------------------------------------------------


class Opener:
    """Takes wire bytes at buf[pos:] and returns (payload, new pos), or None if incomplete.

    ``open_raw`` is the same without the copy: ((plain, first, last), new pos), the
    payload being plain[first:last] of a decrypted buffer that nothing else holds."""

    spec = _NONE_CIPHER

    def open(self, buf: Any, pos: int, seq: int) -> tuple[bytes, int] | None:
        result = self.open_raw(buf, pos, seq)
        if result is None:
            return None
        (plain, first, last), end = result
        return bytes(plain[first:last]), end

    def open_raw(self, buf: Any, pos: int, seq: int) -> tuple[tuple[Any, int, int], int] | None:
        if len(buf) - pos < 4:
            return None
        (packlen,) = _unpack_len(buf, pos)
        _check_len(packlen, self.spec.block_size, 0)
        end = pos + 4 + packlen
        if len(buf) < end:
            return None
        # buf may be the transport's receive buffer, which changes: copy the packet out.
        return _bounds(bytes(buf[pos + 4 : end]), 0, packlen), end


class CtrOpener(Opener):
    def __init__(self, spec: CipherSpec, mac: MacSpec, key: bytes, iv: bytes, mkey: bytes):
        self.spec = spec
        self.etm = mac.etm
        self._dec = Cipher(algorithms.AES(key[: spec.key_size]), modes.CTR(iv[:16])).decryptor()
        self._mac = hmac.HMAC(mkey[: mac.key_size], mac.hash())
        self._maclen = mac.hash.digest_size
        self._first: bytes | None = None  # decrypted first block of a partial packet

    def open_raw(self, buf: Any, pos: int, seq: int) -> tuple[tuple[Any, int, int], int] | None:
        avail = len(buf) - pos
        view = memoryview(buf)
        if self.etm:
            if avail < 4:
                return None
            (packlen,) = _unpack_len(buf, pos)
            _check_len(packlen, 16, 4)
            end = pos + 4 + packlen
            if len(buf) < end + self._maclen:
                return None
            h = self._mac.copy()
            h.update(_pack_len(seq))
            h.update(view[pos:end])
            try:
                h.verify(bytes(buf[end : end + self._maclen]))
            except InvalidSignature:
                raise PacketError(DISCONNECT_MAC_ERROR, "bad MAC") from None
            plain = self._dec.update(view[pos + 4 : end])
            return _bounds(plain, 0, packlen), end + self._maclen
        first = self._first
        if first is None:
            if avail < 16:
                return None
            first = self._dec.update(view[pos : pos + 16])
            self._first = first
        (packlen,) = _unpack_len(first)
        _check_len(packlen, 16, 0)
        end = pos + 4 + packlen
        if len(buf) < end + self._maclen:
            return None
        self._first = None
        plain = first + self._dec.update(view[pos + 16 : end])
        h = self._mac.copy()
        h.update(_pack_len(seq))
        h.update(plain)
        try:
            h.verify(bytes(buf[end : end + self._maclen]))
        except InvalidSignature:
            raise PacketError(DISCONNECT_MAC_ERROR, "bad MAC") from None
        return _bounds(plain, 4, 4 + packlen), end + self._maclen


class GcmOpener(Opener):
    def __init__(self, spec: CipherSpec, key: bytes, iv: bytes):
        self.spec = spec
        self._aead = AESGCM(key[: spec.key_size])
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:12], "big")

    def open_raw(self, buf: Any, pos: int, seq: int) -> tuple[tuple[Any, int, int], int] | None:
        if len(buf) - pos < 4:
            return None
        (packlen,) = _unpack_len(buf, pos)
        _check_len(packlen, 16, 4)
        end = pos + 4 + packlen + 16
        if len(buf) < end:
            return None
        view = memoryview(buf)
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        try:
            plain = self._aead.decrypt(nonce, view[pos + 4 : end], view[pos : pos + 4])
        except InvalidTag:
            raise PacketError(DISCONNECT_MAC_ERROR, "bad MAC") from None
        self._counter = (self._counter + 1) & 0xFFFFFFFFFFFFFFFF
        return _bounds(plain, 0, packlen), end


class ChachaOpener(Opener):
    def __init__(self, spec: CipherSpec, key: bytes):
        self.spec = spec
        self._k2 = key[:32]
        self._k1 = key[32:64]
        self._pending: tuple[int, int] | None = None  # (seq, decrypted length)

    def open_raw(self, buf: Any, pos: int, seq: int) -> tuple[tuple[Any, int, int], int] | None:
        if len(buf) - pos < 4:
            return None
        nonce = _chacha_nonce(seq)
        pending = self._pending
        if pending is not None and pending[0] == seq:
            packlen = pending[1]
        else:
            clear = (
                Cipher(algorithms.ChaCha20(self._k1, nonce), None)
                .decryptor()
                .update(bytes(buf[pos : pos + 4]))
            )
            (packlen,) = _unpack_len(clear)
            _check_len(packlen, 8, 4)
            self._pending = (seq, packlen)
        end = pos + 4 + packlen
        if len(buf) < end + 16:
            return None
        self._pending = None
        view = memoryview(buf)
        stream = Cipher(algorithms.ChaCha20(self._k2, nonce), None).decryptor()
        polykey = stream.update(_ZERO_BLOCK)[:32]
        try:
            Poly1305.verify_tag(polykey, view[pos:end], bytes(buf[end : end + 16]))
        except InvalidSignature:
            raise PacketError(DISCONNECT_MAC_ERROR, "bad MAC") from None
        plain = stream.update(view[pos + 4 : end])
        return _bounds(plain, 0, packlen), end + 16


def make_sealer(cipher: bytes, mac: bytes, key: bytes, iv: bytes, mkey: bytes) -> Sealer:
    spec = CIPHERS[cipher]
    if spec.kind == "chacha":
        return ChachaSealer(spec, key)
    if spec.kind == "gcm":
        return GcmSealer(spec, key, iv)
    return CtrSealer(spec, MACS[mac], key, iv, mkey)


def make_opener(cipher: bytes, mac: bytes, key: bytes, iv: bytes, mkey: bytes) -> Opener:
    spec = CIPHERS[cipher]
    if spec.kind == "chacha":
        return ChachaOpener(spec, key)
    if spec.kind == "gcm":
        return GcmOpener(spec, key, iv)
    return CtrOpener(spec, MACS[mac], key, iv, mkey)


class PacketCrypto:
    """Drop-in for Conch's SSHCiphers: the negotiated names, then one Sealer and one Opener."""

    def __init__(self, outCip: bytes, inCip: bytes, outMac: bytes, inMac: bytes) -> None:
        self.outCipType = outCip
        self.inCipType = inCip
        self.outMACType = outMac
        self.inMACType = inMac
        self.sealer: Sealer = Sealer()
        self.opener: Opener = Opener()

    def setKeys(
        self,
        outIV: bytes,
        outKey: bytes,
        inIV: bytes,
        inKey: bytes,
        outInteg: bytes,
        inInteg: bytes,
    ) -> None:
        self.sealer = make_sealer(self.outCipType, self.outMACType, outKey, outIV, outInteg)
        self.opener = make_opener(self.inCipType, self.inMACType, inKey, inIV, inInteg)

    @property
    def encBlockSize(self) -> int:
        return self.sealer.spec.block_size

    @property
    def decBlockSize(self) -> int:
        return self.opener.spec.block_size


def negotiate(client: list[bytes], server: list[bytes] | tuple[bytes, ...]) -> bytes | None:
    """RFC 4253 7.1: the first of the client's names that the server also supports."""
    offered = set(server)
    for name in client:
        if name in offered:
            return name
    return None


def _mac_for(cipher: bytes | None, client: list[bytes], server: list[bytes]) -> bytes | None:
    if cipher is None:
        return None
    if CIPHERS[cipher].aead:
        return IMPLICIT_MAC  # the cipher authenticates; the MAC lists are not consulted
    return negotiate(client, server)


# -- the transport mixin -----------------------------------------------------------------


if TYPE_CHECKING:
    _TransportBase = conch_transport.SSHServerTransport
else:
    _TransportBase = object


class ModernTransportMixin(_TransportBase):
    """Strict KEX, modern packet modes and rekeying for a Conch SSHServerTransport.

    Place it before ``SSHServerTransport`` in the bases.  The subclass must
    provide ``protocolError(what)`` (log + DISCONNECT protocol error).
    """

    if TYPE_CHECKING:
        # Conch types these narrowly (ITransport | None, bytes, SSHCiphers); this layer
        # replaces them with a bytearray buffer and its own PacketCrypto objects.
        transport: Any
        buf: Any
        nextEncryptions: Any
        currentEncryptions: Any

    # Set per connection by the factory; class defaults for tests.
    supportedCiphers: list[bytes] = list(DEFAULT_CIPHERS)
    supportedMACs: list[bytes] = list(DEFAULT_MACS)
    #: Rekey (server-initiated) after this many bytes in either direction;
    #: 0 means the cipher's OpenSSH default (1 GiB for ChaCha20, 64 GiB for AES).
    rekeyLimit: int = 0

    #: Pseudo-algorithms the initial KEXINIT appends for this role (the client's differ).
    initialKexMarkers: tuple[bytes, ...] = (EXT_INFO_S, KEX_STRICT_S)

    strictKex = False
    _initialKex = True
    _kexInitReceived = False
    _newKeysSent = False
    _inPos = 0
    _sealer: Sealer = Sealer()
    _opener: Opener = Opener()
    _bytesOut = 0
    _bytesIn = 0
    _rekeyAt = 0
    #: Bytes (payloads plus bookkeeping) queued behind the current key exchange.
    _kexQueued = 0

    #: Why reading from the peer is paused now (the socket resumes when none is left).
    _readPauses: frozenset[str] = frozenset()

    def kexQueueGrew(self, queued: int) -> None:
        """A message was queued behind a key exchange; ``queued`` bytes are now held.
        Conch's queue has no bound: the subclass decides when to push back."""

    def pauseReading(self, why: str) -> None:
        """Stop reading from the peer for reason ``why`` (idempotent per reason)."""
        if why in self._readPauses:
            return
        if not self._readPauses:
            self.transport.pauseProducing()
        self._readPauses = self._readPauses | {why}

    def resumeReading(self, why: str) -> None:
        """Reason ``why`` is over: read again once no other reason holds the pause."""
        if why not in self._readPauses:
            return
        self._readPauses = self._readPauses - {why}
        if not self._readPauses:
            self.transport.resumeProducing()

    # outgoing

    def sendKexInit(self) -> None:
        """KEXINIT; the initial one also offers ``initialKexMarkers`` (PROTOCOL 1.10)."""
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            raise RuntimeError(
                f"Cannot send KEXINIT while key exchange state is {self._keyExchangeState!r}"
            )  # noqa: E501
        kex = list(self.supportedKeyExchanges)
        if self.sessionID is None:
            kex += self.initialKexMarkers
        ciphers = b",".join(self.supportedCiphers)
        macs = b",".join(self.supportedMACs)
        comps = b",".join(self.supportedCompressions)
        langs = b",".join(self.supportedLanguages)
        self.ourKexInitPayload = b"".join(
            [
                bytes((MSG_KEXINIT,)),
                os.urandom(16),
                NS(b",".join(kex)),
                NS(b",".join(self.supportedPublicKeys)),
                NS(ciphers),
                NS(ciphers),
                NS(macs),
                NS(macs),
                NS(comps),
                NS(comps),
                NS(langs),
                NS(langs),
                b"\0\0\0\0\0",
            ]
        )
        self.sendPacket(MSG_KEXINIT, self.ourKexInitPayload[1:])
        self._keyExchangeState = self._KEY_EXCHANGE_REQUESTED
        self._blockedByKeyExchange = []
        self._kexQueued = 0

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            if not self._allowedKeyExchangeMessageType(messageType):
                self._blockedByKeyExchange.append((messageType, payload))
                self._kexQueued += len(payload) + _QUEUE_ENTRY_COST
                self.kexQueueGrew(self._kexQueued)
                return
        if self.outgoingCompression:
            packet = self.outgoingCompression.compress(bytes((messageType,)) + payload)  # noqa: E501
            packet += self.outgoingCompression.flush(2)
            messageType, payload = packet[0], packet[1:]
        seq = self.outgoingPacketSequence
        data = self._sealer.seal(seq, messageType, payload)
        self.outgoingPacketSequence = (seq + 1) & _SEQ_MASK
        self.transport.write(data)
        self._bytesOut += len(data)
        if self._rekeyAt and self._bytesOut > self._rekeyAt:
            self._maybeRekey()

    def sendChannelData(self, remoteChannel: int, data: Any) -> None:
        """CHANNEL_DATA without joining ``data`` (bytes or a memoryview) into a payload:
        the packet is sealed from pieces and handed to ``writeSequence``.  During a key
        exchange (or with compression) it takes ``sendPacket``'s ordinary path."""
        head = _pack_data_head(MSG_CHANNEL_DATA, remoteChannel, len(data))
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE or self.outgoingCompression:  # noqa: E501
            ModernTransportMixin.sendPacket(self, MSG_CHANNEL_DATA, head[1:] + bytes(data))
            return
        seq = self.outgoingPacketSequence
        pieces = self._sealer.seal_pieces(seq, head, data)
        self.outgoingPacketSequence = (seq + 1) & _SEQ_MASK
        self.transport.writeSequence(pieces)
        self._bytesOut += sum(map(len, pieces))
        if self._rekeyAt and self._bytesOut > self._rekeyAt:
            self._maybeRekey()

    # incoming

    def dataReceived(self, data: bytes) -> None:
        """Once the version line is in, the receive buffer is a bytearray consumed from
        the front (no ``buf + data`` copies), and CHANNEL_DATA payloads are dispatched
        as memoryviews of the decrypted packet (no slicing copies)."""
        if not self.gotVersion:
            super().dataReceived(data)
            return
        buf = self.buf
        if buf.__class__ is not bytearray:
            buf = self.buf = bytearray(memoryview(buf)[self._inPos :])
            self._inPos = 0
        buf += data
        nextPacket = self._nextPacket
        dispatch = self.dispatchMessage
        channelData = self.dispatchChannelData
        while True:
            found = nextPacket()
            if found is None:
                return
            plain, first, last = found
            msg = plain[first]
            if msg == MSG_CHANNEL_DATA:
                channelData(memoryview(plain)[first + 1 : last])
            else:
                dispatch(msg, bytes(plain[first + 1 : last]))

    def dispatchChannelData(self, packet: memoryview) -> None:
        """A CHANNEL_DATA payload (a memoryview); subclasses may take a shorter path."""
        self.dispatchMessage(MSG_CHANNEL_DATA, packet)

    def getPacket(self) -> bytes | None:
        found = self._nextPacket()
        if found is None:
            return None
        plain, first, last = found
        return bytes(plain[first:last])

    def _nextPacket(self) -> tuple[Any, int, int] | None:
        """The next packet's payload as (plain, first, last), or None."""
        transport = self.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return None
        buf = self.buf
        pos = self._inPos
        seq = self.incomingPacketSequence
        try:
            result = self._opener.open_raw(buf, pos, seq)
        except PacketError as exc:
            self._inPos = 0
            self.buf = b""
            self.sendDisconnect(exc.code, exc.message.encode("ascii"))
            return None
        if result is None:
            if pos:
                if buf.__class__ is bytearray:
                    del buf[:pos]  # cheap: CPython moves the start of a bytearray
                else:
                    self.buf = buf[pos:]
                self._inPos = 0
            return None
        (plain, first, last), end = result
        self._bytesIn += end - pos
        self._inPos = end
        self.incomingPacketSequence = (seq + 1) & _SEQ_MASK
        if self.incomingCompression:
            plain = self.incomingCompression.decompress(bytes(plain[first:last]))  # noqa: E501
            first, last = 0, len(plain)
        if self._initialKex and self.strictKex and not self._strictAllows(plain[first]):
            self.protocolError(  # type: ignore[attr-defined]
                f"strict KEX violation: unexpected message {plain[first]} (seq {seq})"
            )
            return None
        if self._rekeyAt and self._bytesIn > self._rekeyAt:
            self._maybeRekey()
        return plain, first, last

    def _strictAllows(self, messageNum: int) -> bool:
        """During a strict initial KEX only the key exchange itself may arrive, in order."""
        if messageNum == conch_transport.MSG_DISCONNECT:
            return True  # it ends the connection anyway
        if messageNum == MSG_KEXINIT:
            return not self._kexInitReceived
        if messageNum == MSG_NEWKEYS:
            return self._newKeysSent
        if 30 <= messageNum <= 49:
            return self._kexInitReceived and not self._newKeysSent
        return False

    def _kexUsable(self, kexAlg: bytes) -> bool:
        """Whether a negotiated key exchange can be run (never a pseudo-algorithm)."""
        return kexAlg not in PSEUDO_KEX

    def _negotiateKexInit(
        self, packet: bytes, client: bool
    ) -> tuple[list[bytes], list[bytes], bytes] | None:
        """The KEXINIT steps both roles share: strict-KEX check and negotiation (RFC 4253
        7.1, AEAD ciphers implying their MAC) with the client's lists first.

        Returns the peer's kex and host-key lists and the first_kex_packet_follows
        field, or None after a disconnect.
        """
        if self._kexInitReceived:
            self.protocolError("unexpected KEXINIT during key exchange")  # type: ignore[attr-defined]
            return None
        k = getNS(packet[16:], 10)
        kexAlgs, keyAlgs, encCS, encSC, macCS, macSC, compCS, compSC, _, _ = (
            s.split(b",") for s in k[:-1]
        )
        if self._initialKex and self.sessionID is None:
            self.strictKex = (KEX_STRICT_S if client else KEX_STRICT_C) in kexAlgs
            if self.strictKex and self.incomingPacketSequence != 1:
                self.protocolError("strict KEX violation: KEXINIT was not the first packet")  # type: ignore[attr-defined]  # noqa: E501
                return None
        self._kexInitReceived = True
        self.otherKexInitPayload = bytes((MSG_KEXINIT,)) + packet

        def pick(theirs: list[bytes], ours: Any) -> bytes | None:
            return negotiate(list(ours), theirs) if client else negotiate(theirs, ours)

        def pickMac(cipher: bytes | None, theirs: list[bytes]) -> bytes | None:
            ours = list(self.supportedMACs)
            return _mac_for(cipher, ours, theirs) if client else _mac_for(cipher, theirs, ours)

        kexAlg = pick(kexAlgs, self.supportedKeyExchanges)
        keyAlg = pick(keyAlgs, self.supportedPublicKeys)
        cipCS = pick(encCS, self.supportedCiphers)
        cipSC = pick(encSC, self.supportedCiphers)
        cs = (cipCS, pickMac(cipCS, macCS), pick(compCS, self.supportedCompressions))
        sc = (cipSC, pickMac(cipSC, macSC), pick(compSC, self.supportedCompressions))
        (cipOut, macOut, compOut), (cipIn, macIn, compIn) = (cs, sc) if client else (sc, cs)
        chosen = (kexAlg, keyAlg, cipIn, cipOut, macIn, macOut, compIn, compOut)
        if kexAlg is None or None in chosen or not self._kexUsable(kexAlg):
            self.sendDisconnect(DISCONNECT_KEY_EXCHANGE_FAILED, b"couldn't match all kex parts")  # noqa: E501
            return None
        self.kexAlg = kexAlg
        self.keyAlg = keyAlg
        self.nextEncryptions = PacketCrypto(cipOut, cipIn, macOut, macIn)  # type: ignore[arg-type]
        self.outgoingCompressionType = compOut
        self.incomingCompressionType = compIn
        return kexAlgs, keyAlgs, k[-1]

    def ssh_KEXINIT(self, packet: bytes) -> None:
        """Negotiate and note strict KEX, ext-info-c and a wrong guessed KEX packet."""
        peer = self._negotiateKexInit(packet, client=False)
        if peer is None:
            return
        kexAlgs, keyAlgs, rest = peer
        self._peerSupportsExtensions = EXT_INFO_C in kexAlgs
        if self._keyExchangeState == self._KEY_EXCHANGE_REQUESTED:
            self._keyExchangeState = self._KEY_EXCHANGE_PROGRESSING
        else:
            self.sendKexInit()
        if rest[:1] != b"\0" and (
            kexAlgs[0] != self.supportedKeyExchanges[0] or keyAlgs[0] != self.supportedPublicKeys[0]
        ):
            self.ignoreNextPacket = True  # the client's guessed KEX packet was wrong

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        """Derive keys (RFC 4253 7.2), send NEWKEYS and switch the outgoing direction."""
        firstKey = self.sessionID is None
        if firstKey:
            self.sessionID = exchangeHash
        k = {
            c: self._getKey(c, sharedSecret, exchangeHash)
            for c in (b"A", b"B", b"C", b"D", b"E", b"F")
        }  # noqa: E501
        nxt = self.nextEncryptions
        nxt.setKeys(k[b"B"], k[b"D"], k[b"A"], k[b"C"], k[b"F"], k[b"E"])
        self.sendPacket(MSG_NEWKEYS, b"")
        self._sealer = nxt.sealer
        self._newKeysSent = True
        if self.strictKex:
            self.outgoingPacketSequence = 0
        self._bytesOut = 0
        if firstKey:
            self.sendExtInfo([(b"server-sig-algs", b",".join(self.supportedPublicKeys))])  # noqa: E501

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        if packet != b"":
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"NEWKEYS takes no data")  # noqa: E501
            return
        if not self._newKeysSent:
            self.protocolError("NEWKEYS before key exchange")  # type: ignore[attr-defined]
            return
        if self.strictKex:
            self.incomingPacketSequence = 0
        self._opener = self.nextEncryptions.opener
        self._bytesIn = 0
        self._initialKex = False
        self._kexInitReceived = False
        self._newKeysSent = False
        limit = self.rekeyLimit or min(
            CIPHERS[self.nextEncryptions.inCipType].rekey_bytes,
            CIPHERS[self.nextEncryptions.outCipType].rekey_bytes,
        )
        self._rekeyAt = limit
        self._newKeys()

    def _maybeRekey(self) -> None:
        """Start a server-side rekey once the volume limit is passed (OpenSSH RekeyLimit)."""
        if (
            self._keyExchangeState == self._KEY_EXCHANGE_NONE
            and not self._initialKex
            and not getattr(self.transport, "disconnecting", False)
        ):
            self._bytesIn = self._bytesOut = 0
            self.sendKexInit()
