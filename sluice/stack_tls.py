"""TLS material for the embedded Kafka: a self-signed keystore made with the JDK's keytool,
and files only their owner can read (the stack's configs hold passwords)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sluice.errors import StackError


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read: the stack's configs hold passwords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)  # an older file keeps its old mode through O_TRUNC


@dataclass(frozen=True)
class KeyStore:
    """A PKCS12 keystore for a TLS listener and the PEM certificate clients trust."""

    path: Path
    password: str
    certificate: Path


def self_signed_keystore(folder: Path, keytool: str = "keytool",
                         hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                         days: int = 825) -> KeyStore:
    """A self-signed RSA key and certificate for ``hosts``, made once with the JDK's
    ``keytool`` under ``folder`` (``broker.p12``, its password, ``ca.pem``) and reused.

    The certificate names every host as a subject alternative name, so clients verify the
    host name as they would with a real CA; ``ca.pem`` is what they trust
    (``kafka.ssl_cafile``).
    """
    store, secret, pem = folder / "broker.p12", folder / "keystore.password", folder / "ca.pem"
    if store.is_file() and secret.is_file() and pem.is_file():
        return KeyStore(store, secret.read_text().strip(), pem)
    tool = shutil.which(keytool)
    if tool is None:
        raise StackError(f"`{keytool}` (the JDK's keytool) is needed to make the Kafka TLS "
                         "certificate: install a JDK or set stack.kafka_keystore")
    folder.mkdir(parents=True, exist_ok=True)
    store.unlink(missing_ok=True)
    password = secrets.token_urlsafe(24)
    san = ",".join(f"{'ip' if _is_ip(h) else 'dns'}:{h}" for h in hosts)
    for args in (
        ["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048",
         "-validity", str(days), "-dname", f"CN={hosts[-1]}", "-ext", f"SAN={san}",
         "-storetype", "PKCS12", "-keystore", str(store)],
        ["-exportcert", "-rfc", "-alias", "broker", "-keystore", str(store), "-file", str(pem)],
    ):
        # The password travels in the environment, not on the command line (ps shows that).
        done = subprocess.run([tool, *args, "-storepass:env", "SLUICE_KEYSTORE_PASSWORD",
                               "-keypass:env", "SLUICE_KEYSTORE_PASSWORD", "-noprompt"],
                              capture_output=True, text=True, check=False,
                              env={**os.environ, "SLUICE_KEYSTORE_PASSWORD": password})
        if done.returncode != 0:
            raise StackError(f"keytool {args[0]} failed: {(done.stderr or done.stdout).strip()}")
    write_private(secret, password + "\n")
    os.chmod(store, 0o600)
    return KeyStore(store, password, pem)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True
