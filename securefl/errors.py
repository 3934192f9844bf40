"""One exception root for the whole project.

Every error a user can meet is a ``SecureFLError`` whose message says what went wrong and,
where possible, what to do next.  Only the CLI and the TUIs turn them into text for people;
everything below raises.  The split between *local* and *remote* protocol errors follows
h11: a local error means our own code misused the protocol (a bug), a remote error means the
peer sent something we must refuse.
"""

from __future__ import annotations


class SecureFLError(Exception):
    """Root of every error securefl raises on purpose."""

    #: Stable machine-readable code; the wire sends this, never the message text.
    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class ConfigError(SecureFLError):
    """A setting or a combination of settings cannot work (refused before anything runs)."""

    code = "config"


class CryptoError(SecureFLError):
    """A cryptographic check failed: bad signature, tampered envelope, bad key, bad share."""

    code = "crypto"


class ProtocolError(SecureFLError):
    """A protocol rule was broken."""

    code = "protocol"


class LocalProtocolError(ProtocolError):
    """Our own side asked for something the protocol does not allow in this state."""

    code = "local-protocol"


class RemoteProtocolError(ProtocolError):
    """The peer sent something out of order, duplicated, malformed or not allowed."""

    code = "remote-protocol"


class NotEnoughSurvivorsError(ProtocolError):
    """Too few hospitals are left to finish the round (fewer than the threshold)."""

    code = "too-few-hospitals"


class TransportError(SecureFLError):
    """The connection failed: unreachable server, rejected certificate, timeout."""

    code = "transport"


class DataError(SecureFLError):
    """Input data (images, weights, model files) is missing or unusable."""

    code = "data"


class ServerWentBackError(DataError):
    """The server's newest version is older than one this hospital already holds (its store
    was restored from an older backup, or it is not honest): nothing is taken from it or
    sent to it until the operator restores the newest versions."""

    code = "server-went-back"


class StaleVersionError(ProtocolError):
    """An update was trained on an older global model than the one the round aggregates."""

    code = "stale-version"


class ServerUnreachableError(TransportError):
    """No TCP connection to the server (wrong address, server down, firewall)."""

    code = "unreachable"


class CertificateRejectedError(TransportError):
    """The TLS handshake failed: our certificate was refused, or the server's is not trusted."""

    code = "certificate-rejected"


class UpdateAlreadySentError(SecureFLError):
    """This hospital's update for that base version already left (or is already published);
    sending another on the same base could let a server difference two sums."""

    code = "already-sent"


class AgentRunningError(SecureFLError):
    """The hospital's agent owns its state while it runs: train, send and get go through it
    (``securefl.client.agent``), and a second agent for the same hospital is refused."""

    code = "agent-running"


class HospitalBusyError(SecureFLError):
    """Another ``train``, ``get`` or ``send`` of the same hospital is running in another
    process (the CLI, the app, a script): two at once would overwrite each other's model or
    race the send record, and two sends both joined one round."""

    code = "hospital-busy"


class AgentUnavailableError(SecureFLError):
    """No agent answers on this hospital's local socket."""

    code = "no-agent"
