# -*- test-case-name: tests.test_cluster_hop -*-
"""The client role of nuttconch's SSH transport, for the hop between nodes.

``crypto.ModernTransportMixin`` is written for the server: its KEXINIT
carries the server's pseudo-algorithms (``kex-strict-s``), negotiation
reads the peer's lists as the client's, and keys are taken with the
server's letters.  A node dialling another node must use the same packet
layer (the fast AEAD sealers, strict KEX, volume rekeys) from the other
side: KEXINIT only swaps its markers (``initialKexMarkers``), negotiation
and key taking are mirrored here; everything else (packet parsing, the
strict-KEX message filter, NEWKEYS) is shared as it is.
Conch's own client code does the ECDH exchange and host-key signature
check; it does not negotiate the post-quantum hybrid, so only the
elliptic-curve methods are offered.
"""

from __future__ import annotations

from twisted.conch.ssh import _kex
from twisted.conch.ssh import transport as conch_transport
from twisted.conch.ssh.common import NS

from ..crypto import (
    KEX_STRICT_C,
    MSG_NEWKEYS,
    ModernTransportMixin,
    available_kex,
)

#: Host-key signature algorithms the hop client accepts, most preferred first (no SHA-1).
HOST_KEY_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)


def client_kex() -> list[bytes]:
    """The key exchanges Conch's client can run: the elliptic-curve ones only."""
    return [k for k in available_kex() if _kex.isEllipticCurve(k)]


class ClientTransportMixin(ModernTransportMixin):
    """ModernTransportMixin for a Conch ``SSHClientTransport`` (place it first in the bases).

    The subclass provides ``protocolError(what)`` and ``connectionSecure()``.
    """

    supportedKeyExchanges = client_kex()
    supportedPublicKeys = list(HOST_KEY_ALGORITHMS)

    #: The client's marker: strict KEX (Terrapin) from the first packet.  ext-info-c is
    #: not offered: the hop's user key is ed25519, which needs no server-sig-algs to
    #: pick a signature algorithm.
    initialKexMarkers = (KEX_STRICT_C,)

    def _kexUsable(self, kexAlg: bytes) -> bool:
        """Conch's client runs only the elliptic-curve exchanges."""
        return super()._kexUsable(kexAlg) and _kex.isEllipticCurve(kexAlg)

    def ssh_KEXINIT(self, packet: bytes) -> None:
        """Negotiate with our lists first (we are the client), then send our ECDH share."""
        if self._negotiateKexInit(packet, client=True) is None:
            return
        if self._keyExchangeState == self._KEY_EXCHANGE_REQUESTED:
            self._keyExchangeState = self._KEY_EXCHANGE_PROGRESSING
        else:
            self.sendKexInit()
            self._keyExchangeState = self._KEY_EXCHANGE_PROGRESSING
        self.ecPriv = self._generateECPrivateKey()
        self.ecPub = self.ecPriv.public_key()
        self.sendPacket(
            conch_transport.MSG_KEX_DH_GEX_REQUEST_OLD, NS(self._encodeECPublicKey(self.ecPub))
        )

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        """Derive keys with the client's letters (RFC 4253 7.2) and send NEWKEYS."""
        if self.sessionID is None:
            self.sessionID = exchangeHash
        k = {
            c: self._getKey(c, sharedSecret, exchangeHash)
            for c in (b"A", b"B", b"C", b"D", b"E", b"F")
        }
        nxt = self.nextEncryptions
        # outIV, outKey, inIV, inKey, outInteg, inInteg: client to server is A, C, E.
        nxt.setKeys(k[b"A"], k[b"C"], k[b"B"], k[b"D"], k[b"E"], k[b"F"])
        self.sendPacket(MSG_NEWKEYS, b"")
        self._sealer = nxt.sealer
        self._newKeysSent = True
        if self.strictKex:
            self.outgoingPacketSequence = 0
        self._bytesOut = 0

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        first = self._initialKex
        super().ssh_NEWKEYS(packet)
        if first and not self._initialKex:
            self.connectionSecure()  # type: ignore[attr-defined]
