"""A busybox container image built offline, for runtimes that cannot reach a registry.

The root file system comes from Debian's ``busybox-static`` (one static binary, so the
image needs no libraries): ``busybox --install -s`` makes the applet links, ``www/``
holds the page ``httpd -f -p 80 -h /www`` serves. Three forms, built once per test
session into one temporary directory:

- ``rootfs.tar``: for ``podman import`` and ``docker import``;
- ``oci.tar``: an OCI image layout archive (``oci-layout``, ``index.json``, blobs) for
  ``ctr image import``, written by hand (no Podman needed); its index carries the
  ``io.containerd.image.name`` annotation so containerd names the image ``REF``;
- ``rootfs/``: the directory itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = "/bin/busybox"
REF = "localhost/bb:latest"
PAGE = "hello from busybox httpd\n"
DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "www")


@dataclass(frozen=True)
class Images:
    root: Path
    rootfs: Path
    rootfs_tar: Path
    oci_tar: Path
    ref: str = REF
    page: str = PAGE


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_rootfs(target: Path, page: str = PAGE) -> None:
    """The busybox tree: applet links made by ``busybox --install -s`` run chrooted in the
    tree (so each link points at ``/bin/busybox`` as the container sees it)."""
    if not Path(BUSYBOX).exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    for d in DIRS:
        (target / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, target / "bin" / "busybox")
    subprocess.run(
        ["chroot", str(target), "/bin/busybox", "--install", "-s"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    (target / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (target / "etc" / "group").write_text("root:x:0:\n")
    (target / "www" / "index.html").write_text(page)
    (target / "tmp").chmod(0o1777)


def _tar_tree(tree: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    return buf.getvalue()


def oci_archive(layer: bytes, ref: str = REF) -> bytes:
    """An OCI image layout (v1.0.0) as a tar: one uncompressed layer, an image config
    whose ``diff_ids`` names that layer, a manifest, and an index naming the image."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
    ).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", index)
        for blob in (config, manifest, layer):
            add("blobs/sha256/" + _digest(blob)[len("sha256:") :], blob)
    return buf.getvalue()


def build_images(root: Path, ref: str = REF, page: str = PAGE) -> Images:
    rootfs = root / "rootfs"
    build_rootfs(rootfs, page)
    layer = _tar_tree(rootfs)
    rootfs_tar = root / "rootfs.tar"
    rootfs_tar.write_bytes(layer)
    oci_tar = root / "oci.tar"
    oci_tar.write_bytes(oci_archive(layer, ref))
    return Images(root, rootfs, rootfs_tar, oci_tar, ref, page)


_CACHE: dict[str, Images] = {}


def session_images() -> Images:
    """The images, built on first use and kept for the rest of the process (a pytest
    session); ``remove_session_images`` deletes them."""
    if "default" not in _CACHE:
        _CACHE["default"] = build_images(Path(tempfile.mkdtemp(prefix="netagent-images-")))
    return _CACHE["default"]


def remove_session_images() -> None:
    images = _CACHE.pop("default", None)
    if images is not None:
        shutil.rmtree(images.root, ignore_errors=True)
