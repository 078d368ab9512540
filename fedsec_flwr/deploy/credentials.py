"""TLS and SuperNode-authentication credentials for a Flower deployment.

One call of `create_credentials` writes, with the ``cryptography`` package
only:

- a certificate authority: ``ca.key`` and the self-signed ``ca.crt``;
- the SuperLink's TLS key ``server.key`` and its certificate ``server.crt``,
  signed by the CA, whose subject alternative names list every host name and
  IP address that SuperNodes and the ``flwr`` CLI use to reach the SuperLink;
- one authentication key pair per SuperNode, ``supernode-<i>.key`` (OpenSSH
  private key) and ``supernode-<i>.pub`` (``ecdsa-sha2-nistp384 ...``), which
  is the format ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read in flwr 1.42.

Every key is ECDSA on NIST P-384. Private keys are created with mode 0600 and
the output folder with mode 0700. Existing files are replaced only when the
caller passes ``force=True``. Private keys are written unencrypted because the
SuperLink and SuperNodes read them unattended, so the folder permissions are
their only protection.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import re
import stat
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger("fedsec_flwr.deploy")

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700

CA_KEY_FILENAME = "ca.key"
CA_CERT_FILENAME = "ca.crt"
SERVER_KEY_FILENAME = "server.key"
SERVER_CERT_FILENAME = "server.crt"
SUPERNODE_KEY_PREFIX = "supernode-"

DEFAULT_VALIDITY_DAYS = 365
MAX_VALIDITY_DAYS = 3650
CA_COMMON_NAME = "fedsec_flwr deployment CA"
ORGANIZATION_NAME = "fedsec_flwr"

# RFC 1123 host-name label: letters, digits and inner hyphens, 1 to 63 chars.
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_MAX_DNS_NAME_LENGTH = 253
# Backdating absorbs clock skew between the machine that signs the
# certificates and the machines that check them.
_NOT_BEFORE_SKEW = datetime.timedelta(minutes=5)


class CredentialsError(Exception):
    """Invalid arguments, or credential files that cannot be written."""


@dataclass(frozen=True)
class CredentialPaths:
    """Files of one credentials folder, named by role.

    Attributes:
        directory: Folder that contains every file.
        num_supernodes: Number of SuperNode key pairs in the folder.
    """

    directory: Path
    num_supernodes: int

    @property
    def ca_key(self) -> Path:
        """CA private key, which signs the server certificate. Keep it offline."""
        return self.directory / CA_KEY_FILENAME

    @property
    def ca_cert(self) -> Path:
        """CA certificate that SuperNodes and the CLI use to verify the SuperLink."""
        return self.directory / CA_CERT_FILENAME

    @property
    def server_key(self) -> Path:
        """TLS private key of the SuperLink."""
        return self.directory / SERVER_KEY_FILENAME

    @property
    def server_cert(self) -> Path:
        """TLS certificate of the SuperLink, signed by the CA."""
        return self.directory / SERVER_CERT_FILENAME

    def supernode_key(self, index: int) -> Path:
        """Authentication private key (OpenSSH format) of SuperNode ``index``."""
        return self.directory / f"{SUPERNODE_KEY_PREFIX}{index}.key"

    def supernode_public_key(self, index: int) -> Path:
        """Authentication public key (OpenSSH format) of SuperNode ``index``."""
        return self.directory / f"{SUPERNODE_KEY_PREFIX}{index}.pub"

    def private_files(self) -> list[Path]:
        """Return every private-key path, which must stay mode 0600."""
        nodes = [self.supernode_key(i) for i in range(self.num_supernodes)]
        return [self.ca_key, self.server_key, *nodes]

    def public_files(self) -> list[Path]:
        """Return every certificate and public-key path."""
        nodes = [self.supernode_public_key(i) for i in range(self.num_supernodes)]
        return [self.ca_cert, self.server_cert, *nodes]

    def all_files(self) -> list[Path]:
        """Return every path that `create_credentials` writes."""
        return self.private_files() + self.public_files()


@dataclass(frozen=True)
class SubjectAltNames:
    """Validated host names of the SuperLink certificate.

    Attributes:
        dns_names: DNS names, in the order given.
        ip_addresses: IPv4 and IPv6 addresses, in the order given.
    """

    dns_names: tuple[str, ...]
    ip_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]

    def to_extension(self) -> x509.SubjectAlternativeName:
        """Build the X.509 extension with DNS and IP entries kept apart."""
        entries: list[x509.GeneralName] = [x509.DNSName(n) for n in self.dns_names]
        entries += [x509.IPAddress(address) for address in self.ip_addresses]
        return x509.SubjectAlternativeName(entries)

    def first_name(self) -> str:
        """Return the name used as the certificate's common name."""
        if self.dns_names:
            return self.dns_names[0]
        return str(self.ip_addresses[0])


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


def parse_hosts(hosts: Sequence[str]) -> SubjectAltNames:
    """Sort host arguments into IP addresses and DNS names, checking each.

    Args:
        hosts: Host names or IP addresses under which the SuperLink is
            reached, such as ``127.0.0.1``, ``::1`` or ``superlink.example.org``.

    Returns:
        The validated names without duplicates.

    Raises:
        CredentialsError: If ``hosts`` is empty or a host is neither an IP
            address nor a valid DNS name; the message lists every bad host.
    """
    if not hosts:
        raise CredentialsError(
            "--host must be given at least once, with each name or IP address "
            "that SuperNodes use to reach the SuperLink. Found none."
        )

    dns_names: list[str] = []
    ip_addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    problems: list[str] = []
    for host in hosts:
        address = None if "%" in host else _parse_ip_address(host)
        if address is not None:
            if address not in ip_addresses:
                ip_addresses.append(address)
            continue
        problem = _dns_name_problem(host)
        if problem:
            problems.append(problem)
        elif host.lower() not in dns_names:
            dns_names.append(host.lower())

    if problems:
        raise CredentialsError(" ".join(problems))
    return SubjectAltNames(tuple(dns_names), tuple(ip_addresses))


def _parse_ip_address(
    host: str,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _dns_name_problem(host: str) -> str:
    if "%" in host:
        return (
            f"--host {host!r} is invalid: IPv6 zone ids such as '%eth0' cannot "
            "appear in a certificate. Give the address without the zone."
        )
    if not host.isascii():
        return (
            f"--host {host!r} is invalid: DNS names must be ASCII. Give the "
            "IDNA form (xn--...)."
        )
    if len(host) > _MAX_DNS_NAME_LENGTH:
        return (
            f"--host {host[:40]!r}... is invalid: a DNS name has at most "
            f"{_MAX_DNS_NAME_LENGTH} characters. Found {len(host)}."
        )
    labels = host.removesuffix(".").split(".")
    if not all(_DNS_LABEL.match(label) for label in labels):
        return (
            f"--host {host!r} is neither an IP address nor a DNS name: each "
            "dot-separated label must be 1 to 63 letters, digits or inner "
            "hyphens."
        )
    if labels[-1].isdigit():
        return (
            f"--host {host!r} is invalid: it looks like an IPv4 address but is "
            "not one, and a DNS name cannot end in a numeric label."
        )
    return ""


def check_num_supernodes(num_supernodes: int) -> None:
    """Reject a SuperNode count below 1.

    Raises:
        CredentialsError: If ``num_supernodes`` is not an integer of at least 1.
    """
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int):
        raise CredentialsError(f"--nodes must be an integer. Found {num_supernodes!r}.")
    if num_supernodes < 1:
        raise CredentialsError(f"--nodes must be at least 1. Found {num_supernodes}.")


def check_validity_days(days: int) -> None:
    """Reject a certificate lifetime outside 1 to `MAX_VALIDITY_DAYS` days.

    Raises:
        CredentialsError: If ``days`` is out of range.
    """
    if not 1 <= days <= MAX_VALIDITY_DAYS:
        raise CredentialsError(
            f"--days must be between 1 and {MAX_VALIDITY_DAYS}. Found {days}."
        )


def validate_arguments(
    hosts: Sequence[str], num_supernodes: int, days: int
) -> SubjectAltNames:
    """Check every argument of `create_credentials` and report all problems at once.

    Returns:
        The validated host names.

    Raises:
        CredentialsError: Listing every invalid argument.
    """
    problems: list[str] = []
    names: SubjectAltNames | None = None
    try:
        names = parse_hosts(hosts)
    except CredentialsError as error:
        problems.append(str(error))
    for check, value in (
        (check_num_supernodes, num_supernodes),
        (check_validity_days, days),
    ):
        try:
            check(value)
        except CredentialsError as error:
            problems.append(str(error))

    if problems or names is None:
        raise CredentialsError(" ".join(problems))
    return names


# --------------------------------------------------------------------------
# Keys and certificates
# --------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """Generate an ECDSA private key on NIST P-384."""
    return ec.generate_private_key(ec.SECP384R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION_NAME),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - _NOT_BEFORE_SKEW, now + datetime.timedelta(days=days)


def build_ca_certificate(
    key: ec.EllipticCurvePrivateKey, *, days: int
) -> x509.Certificate:
    """Build a self-signed CA certificate that may sign only leaf certificates.

    Args:
        key: CA private key.
        days: Validity period in days.

    Returns:
        The certificate, with ``pathlen=0`` so the CA cannot delegate.
    """
    not_before, not_after = _validity(days)
    name = _name(f"{CA_COMMON_NAME} {uuid.uuid4().hex[:8]}")
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
    )
    return builder.sign(key, hashes.SHA384())


def build_server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: SubjectAltNames,
    days: int,
) -> x509.Certificate:
    """Build the SuperLink's TLS server certificate, signed by the CA.

    Args:
        server_key: SuperLink private key.
        ca_key: CA private key, which signs the certificate.
        ca_cert: CA certificate, the issuer.
        names: Host names and addresses the certificate is valid for.
        days: Validity period in days; capped at the CA's own expiry.

    Returns:
        A leaf certificate for TLS server authentication.
    """
    not_before, not_after = _validity(days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    public_key = server_key.public_key()
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names.first_name()))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(names.to_extension(), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_key_id.value
            ),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA384())


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialize a TLS private key as unencrypted PKCS #8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_certificate(certificate: x509.Certificate) -> bytes:
    """Serialize a certificate as PEM."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def openssh_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialize a SuperNode key in the unencrypted OpenSSH private-key format."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def openssh_public_key(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    """Serialize a public key as one ``ecdsa-sha2-nistp384 <base64> <comment>`` line."""
    encoded = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return encoded + b" " + comment.encode("ascii") + b"\n"


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def prepare_directory(directory: Path) -> None:
    """Create ``directory`` with mode 0700, or check an existing one.

    Raises:
        CredentialsError: If the path is not a folder, or an existing folder
            grants any access to group or others.
    """
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise CredentialsError(f"--out must be a folder. Found a file: {directory}.")

    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise CredentialsError(
            f"--out folder {directory} has mode {mode:04o}, but it must grant no "
            "access to group or others (0700) because it will contain private "
            "keys. "
            f"Run 'chmod 700 {directory}' or choose a new folder."
        )


def check_no_existing_files(paths: Sequence[Path]) -> None:
    """Reject a run that would replace files, listing every one of them.

    Raises:
        CredentialsError: If any path exists.
    """
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        raise CredentialsError(
            "Credential files already exist and would be replaced: "
            f"{', '.join(existing)}. Pass --force to replace them, or choose "
            "another --out folder."
        )


def write_file(path: Path, data: bytes, *, mode: int, replace: bool) -> None:
    """Write ``data`` to ``path`` without the file ever having a wider mode.

    The bytes go to a new temporary file in the same folder, created with
    ``mode`` by ``open(2)``, which is then renamed to ``path``. Without
    ``replace`` the rename is a hard link, which fails if ``path`` exists.

    Raises:
        CredentialsError: If ``path`` exists and ``replace`` is false, or the
            created file's mode is wider than ``mode`` would allow.
    """
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            _check_mode(temporary, os.fstat(stream.fileno()).st_mode, mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        _move_into_place(temporary, path, replace=replace)
    finally:
        # After a hard link or on error the temporary name is still there.
        temporary.unlink(missing_ok=True)


def _check_mode(path: Path, st_mode: int, allowed: int) -> None:
    actual = stat.S_IMODE(st_mode)
    if actual & ~allowed:
        raise CredentialsError(
            f"{path} was created with mode {actual:04o}, wider than the "
            f"requested {allowed:04o}."
        )


def _move_into_place(temporary: Path, path: Path, *, replace: bool) -> None:
    if replace:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError as error:
        raise CredentialsError(
            f"{path} already exists. Pass --force to replace it."
        ) from error


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def create_credentials(
    directory: Path,
    *,
    hosts: Sequence[str],
    num_supernodes: int,
    days: int = DEFAULT_VALIDITY_DAYS,
    force: bool = False,
) -> CredentialPaths:
    """Create the CA, the SuperLink TLS credentials and the SuperNode keys.

    Every argument is checked and every existing file is reported before the
    first file is written.

    Args:
        directory: Output folder, created with mode 0700 if missing.
        hosts: Host names and IP addresses of the SuperLink, all placed in
            the server certificate's subject alternative names.
        num_supernodes: Number of SuperNode key pairs, at least 1.
        days: Validity of the certificates in days.
        force: Replace existing credential files.

    Returns:
        The paths of the written files.

    Raises:
        CredentialsError: If an argument is invalid, the folder is readable by
            others, or files exist and ``force`` is false.
    """
    names = validate_arguments(hosts, num_supernodes, days)
    paths = CredentialPaths(directory, num_supernodes)
    prepare_directory(directory)
    if not force:
        check_no_existing_files(paths.all_files())

    ca_key = generate_key()
    ca_cert = build_ca_certificate(ca_key, days=days)
    server_key = generate_key()
    server_cert = build_server_certificate(
        server_key, ca_key=ca_key, ca_cert=ca_cert, names=names, days=days
    )

    _write_private(paths.ca_key, pem_private_key(ca_key), force)
    _write_public(paths.ca_cert, pem_certificate(ca_cert), force)
    _write_private(paths.server_key, pem_private_key(server_key), force)
    _write_public(paths.server_cert, pem_certificate(server_cert), force)
    for index in range(num_supernodes):
        write_supernode_key_pair(
            paths.supernode_key(index), paths.supernode_public_key(index), force=force
        )

    logger.info(
        "Wrote credentials for %d SuperNode(s) to %s. Server certificate names: %s",
        num_supernodes,
        directory,
        ", ".join([*names.dns_names, *map(str, names.ip_addresses)]),
    )
    return paths


def write_supernode_key_pair(
    private_path: Path, public_path: Path, *, force: bool = False
) -> None:
    """Generate one SuperNode authentication key pair and write both files.

    Args:
        private_path: Destination of the OpenSSH private key (mode 0600).
        public_path: Destination of the ``ecdsa-sha2-nistp384`` public key.
        force: Replace existing files.

    Raises:
        CredentialsError: If a file exists and ``force`` is false.
    """
    if not force:
        check_no_existing_files([private_path, public_path])
    key = generate_key()
    comment = private_path.stem
    _write_private(private_path, openssh_private_key(key), force)
    _write_public(public_path, openssh_public_key(key, comment), force)


def _write_private(path: Path, data: bytes, replace: bool) -> None:
    write_file(path, data, mode=PRIVATE_FILE_MODE, replace=replace)


def _write_public(path: Path, data: bytes, replace: bool) -> None:
    write_file(path, data, mode=PUBLIC_FILE_MODE, replace=replace)
