"""Offline stand-in for the pip bootstrap script that ansible-test downloads.

ansible-test runs its get-pip script inside each virtual environment it makes,
with pip's own arguments (the pinned pip version, --no-setuptools, ...). This
stand-in installs the pip that ships with Python (ensurepip, no download),
records in the environment's own pip.conf the certificate bundle the host
trusts (ansible-test passes pip a trimmed environment, without PIP_CERT), and
then asks that pip for the requested version from the configured index.
"""

import ensurepip
import os
import ssl
import subprocess
import sys

IGNORED = {"--no-setuptools", "--no-wheel"}


def trusted_bundle():
    """The CA bundle this host's tools use, if one can be found."""
    for path in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                 "/etc/ssl/certs/ca-certificates.crt", ssl.get_default_verify_paths().cafile):
        if path and os.path.isfile(path):
            return path
    return None


ensurepip.bootstrap(upgrade=True)
# ensurepip points PIP_CONFIG_FILE at /dev/null for itself and leaves it set.
os.environ.pop("PIP_CONFIG_FILE", None)
bundle = trusted_bundle()
if bundle:
    with open(os.path.join(sys.prefix, "pip.conf"), "w", encoding="utf-8") as f:
        f.write(f"[global]\ncert = {bundle}\n")
args = [a for a in sys.argv[1:] if a not in IGNORED]
subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", *args])
