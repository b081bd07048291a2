"""TLS material for fedberry: a private CA, the chief's certificate, worker certificates, and the
``ssl`` contexts the TCP transport uses.

The operator runs their own CA (``fedberry certs``): the chief and the workers trust that CA only,
never the system store, so a certificate bought from anyone else cannot impersonate a chief.

Making certificates (``issue``) needs the optional ``cryptography`` package
(``pip install 'fedberry[tls]'``); building ``ssl`` contexts (``contexts``) and explaining TLS
errors (``explain``) need only the standard library, so ``import fedberry.certs`` always works and
a worker with ready-made files does not need the extra. ``cli`` is the ``fedberry certs`` command.
"""

from fedberry.certs.cli import add_certs_parser, run_certs
from fedberry.certs.contexts import (
    cert_names,
    client_cert_name,
    client_context,
    peer_certificate_names,
    server_context,
)
from fedberry.certs.explain import describe_tls_error
from fedberry.certs.files import (
    CA_CERT,
    CA_KEY,
    CHIEF_CERT,
    CHIEF_KEY,
    MissingTLSExtraError,
    PathLike,
)
from fedberry.certs.issue import (
    _issue_leaf,  # noqa: F401  (tests issue odd certificates through it)
    _save_pair,  # noqa: F401
    create_ca,
    create_chief_cert,
    create_client_cert,
)

__all__ = [
    "CA_CERT", "CA_KEY", "CHIEF_CERT", "CHIEF_KEY", "MissingTLSExtraError", "PathLike",
    "add_certs_parser", "cert_names", "client_cert_name", "client_context", "create_ca",
    "create_chief_cert", "create_client_cert", "describe_tls_error", "peer_certificate_names",
    "run_certs", "server_context",
]
