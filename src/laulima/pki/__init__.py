"""The federation's certificate authority and the enrolment bundle a site installs.

:mod:`laulima.pki.ca` creates the CA, issues hub and site certificates (EC P-256, short
validity) and keeps the list of revoked serials the hub checks on every request;
:mod:`laulima.pki.bundle` packs what a site needs into one file and installs it.
"""

from __future__ import annotations

from laulima.pki.ca import (
    CertificateAuthority,
    Identity,
    IssuedCert,
    RevocationList,
    identity_of,
)

__all__ = ["CertificateAuthority", "IssuedCert", "Identity", "RevocationList", "identity_of"]
