"""Fetch the chat page's third-party scripts from the npm registry, pinned and verified.

The page runs without a build step and without a CDN: rillm serves these files itself from
rillm/server/static/vendor/. This script is how they got there, and how to move a pin:

    python tools/vendor_web.py            # download, verify, write the files and MANIFEST.json
    python tools/vendor_web.py --check    # only check the files against MANIFEST.json

A pin is a (package, version, npm integrity) triple below; the tarball's sha512 must equal the
registry's integrity string before anything is extracted. MANIFEST.json records each written
file's sha256, which tests/client/test_chat_page.py checks, so a hand edit is caught.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

VENDOR = Path(__file__).parents[1] / "rillm" / "server" / "static" / "vendor"

PINS = [
    {
        "package": "marked",
        "version": "18.3.0",
        "integrity": "sha512-ed8zmPXlBb3UfGXN5iHMQyMhFpdqLgoV5umUXx/Q1R+FW3q8VpqpyoKUwlENL9appo2U"
                     "MvNLURDVaT3AMOryGA==",
        "files": {"package/lib/marked.umd.js": "marked.umd.js",
                  "package/LICENSE": "marked.LICENSE"},
    },
    {
        "package": "dompurify",
        "version": "3.5.0",
        "integrity": "sha512-LYC0ZkE8P1V42JsRYTwMdme/2ET8SpOc5AA2eOFjP/IadvRd2fwiT4TVz5vkfy0XUx12"
                     "aS2UaRkTnfVPNOv9vw==",
        "files": {"package/dist/purify.min.js": "purify.min.js",
                  "package/LICENSE": "dompurify.LICENSE"},
    },
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(pin: dict) -> dict[str, bytes]:
    name, version = pin["package"], pin["version"]
    url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        tarball = response.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != pin["integrity"]:
        raise SystemExit(f"{name}@{version}: integrity {digest} != pinned {pin['integrity']}")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member, target in pin["files"].items():
            extracted = archive.extractfile(member)
            if extracted is None:
                raise SystemExit(f"{name}@{version}: {member} is not a file")
            out[target] = extracted.read()
    return out


def check() -> int:
    manifest = json.loads((VENDOR / "MANIFEST.json").read_text())
    bad = [name for name, entry in manifest["files"].items()
           if sha256((VENDOR / name).read_bytes()) != entry["sha256"]]
    for name in bad:
        print(f"{name}: does not match MANIFEST.json", file=sys.stderr)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the vendored files")
    if parser.parse_args().check:
        return check()
    VENDOR.mkdir(parents=True, exist_ok=True)
    files = {}
    for pin in PINS:
        for target, data in fetch(pin).items():
            (VENDOR / target).write_bytes(data)
            files[target] = {"package": pin["package"], "version": pin["version"],
                             "integrity": pin["integrity"], "sha256": sha256(data)}
    (VENDOR / "MANIFEST.json").write_text(json.dumps({"files": files}, indent=2) + "\n")
    print(f"wrote {len(files)} files to {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
