"""Run CNI plugins for a network configuration list exactly the way libcni does.

A Python rendering of ``containernetworking/cni`` ``libcni/api.go`` (v1.2, CNI spec
1.1.0), so tests and benchmarks call a plugin (the reference plugins, netagent's plugin)
as containerd, CRI-O and Podman's CNI backend call it:

- ADD runs each plugin in order with ``CNI_COMMAND=ADD``, ``CNI_CONTAINERID``,
  ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS`` (``K=V;K=V``), ``CNI_PATH``, and on stdin
  the plugin's configuration with ``name`` and ``cniVersion`` of the list injected,
  ``prevResult`` (the previous plugin's result, absent for the first one) and
  ``runtimeConfig`` (the runtime's capability arguments that the plugin's
  ``capabilities`` enable; absent when none). The final result is cached.
- DEL runs them in reverse order with the cached ADD result as ``prevResult``
  (configurations at 0.4.0 and later), then drops the cache entry; CHECK in order with
  the cached result (0.4.0 and later, skipped when ``disableCheck``).
- STATUS and GC exist from 1.1.0 on: STATUS asks each plugin, stopping at the first
  error; GC first DELs every cached attachment of the network that is not in the valid
  list (whatever the version), then, at 1.1.0, sends each plugin ``GC`` with
  ``cni.dev/valid-attachments`` (and ``cni.dev/attachments``, the name libcni also
  sends because an earlier spec text used it), collecting all errors.
- VERSION sends ``{"cniVersion": "1.1.0"}`` with libcni's dummy ``CNI_NETNS``,
  ``CNI_IFNAME`` and ``CNI_PATH`` (plugins built on an older skel insist on them).

Where libcni and the spec text differ, this follows libcni: the ``capabilities`` key is
passed through to the plugin (the spec says it must not be set), and results are not
converted between versions. The cache has libcni's format and place
(``<cache_dir>/results/<network>-<containerID>-<ifname>``, kind ``cniCacheV1``), so an
attachment added by containerd's go-cni can be deleted from here and vice versa.

Every plugin run has a time limit. A failing plugin raises :class:`CNIError` with the
error object it printed (``code``, ``msg``, ``details``), or its stderr when it printed
none. Plugins run through an :data:`Exec`: :func:`local_exec` runs them directly (use it
inside the sandbox), :class:`SandboxExec` runs them in a sandbox with ``nsenter``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netagent.cli.sandbox import Sandbox

CURRENT = "1.1.0"  # the spec version this driver implements (libcni's version.Current())
CACHE_KIND = "cniCacheV1"
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")

# (argv, stdin, env, timeout) -> (exit status, stdout, stderr)
Exec = Callable[[list[str], bytes, dict[str, str], float], tuple[int, bytes, bytes]]


class CNIError(Exception):
    """A plugin failed (or could not run). ``code``/``msg``/``details`` are the plugin's
    error object; ``code`` is None when it printed none (crash, time limit, not found)."""

    def __init__(
        self,
        msg: str,
        code: int | None = None,
        details: str = "",
        plugin: str = "",
        command: str = "",
        stderr: str = "",
        errors: Sequence[CNIError] = (),
    ) -> None:
        self.code, self.msg, self.details = code, msg, details
        self.plugin, self.command, self.stderr = plugin, command, stderr
        self.errors = list(errors)
        where = f"plugin {plugin} failed ({command.lower()}): " if plugin else ""
        text = f"{where}{msg}" + (f": {details}" if details else "")
        super().__init__(text + (f" [code {code}]" if code is not None else ""))


def local_exec(
    argv: list[str], stdin: bytes, env: dict[str, str], timeout: float
) -> tuple[int, bytes, bytes]:
    """Run a plugin here, retrying "text file busy" like libcni's RawExec (a plugin
    binary being written while it is started)."""
    for attempt in range(6):
        try:
            r = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=timeout)
            return r.returncode, r.stdout, r.stderr
        except OSError as exc:
            if exc.errno != errno.ETXTBSY or attempt == 5:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


class SandboxExec:
    """Run plugins inside a sandbox's network and mount namespaces (the runtime's
    networking domain, as the spec requires); adds one ``nsenter`` exec per run."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box

    def __call__(
        self, argv: list[str], stdin: bytes, env: dict[str, str], timeout: float
    ) -> tuple[int, bytes, bytes]:
        r = subprocess.run(
            self.box.argv(argv), input=stdin, env=env, capture_output=True, timeout=timeout
        )
        return r.returncode, r.stdout, r.stderr


def _version_tuple(v: str) -> tuple[int, int, int]:
    parts = [int(p) for p in v.split(".")]
    if not parts or len(parts) > 3:
        raise ValueError(f"invalid version {v!r}")
    major, minor, patch = [*parts, 0, 0][:3]
    return major, minor, patch


def version_at_least(v: str, floor: str) -> bool:
    return _version_tuple(v or "0.1.0") >= _version_tuple(floor)


@dataclass
class NetworkConfigList:
    """A parsed ``.conflist`` (libcni ``ConfListFromBytes``): the selected version is the
    highest of ``cniVersion`` and ``cniVersions`` not above 1.1.0."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    disable_check: bool = False
    disable_gc: bool = False
    raw: bytes = b""

    @classmethod
    def from_bytes(cls, data: bytes) -> NetworkConfigList:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
            raise ValueError("error parsing configuration list: no name")
        version = doc.get("cniVersion", "")
        if not isinstance(version, str):
            raise ValueError("error parsing configuration list: invalid cniVersion")
        if "cniVersions" in doc:
            versions = [v for v in doc["cniVersions"] if not version_at_least(v, "1.1.1")]
            if version and not version_at_least(version, "1.1.1"):
                versions.append(version)
            if versions:
                version = max(versions, key=_version_tuple)
        plugins = doc.get("plugins")
        if "plugins" not in doc and "type" in doc:  # a single .conf: ConfListFromConf
            plugins = [doc]
        if not isinstance(plugins, list) or not plugins:
            raise ValueError("error parsing configuration list: no plugins in list")

        def flag(key: str) -> bool:
            value = doc.get(key, False)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError(f"error parsing configuration list: invalid {key}")
            return value

        return cls(doc["name"], version, plugins, flag("disableCheck"), flag("disableGC"), data)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> NetworkConfigList:
        return cls.from_bytes(json.dumps(doc).encode())

    @classmethod
    def from_file(cls, path: str | Path) -> NetworkConfigList:
        return cls.from_bytes(Path(path).read_bytes())


@dataclass
class RuntimeConf:
    """One attachment's parameters (libcni ``RuntimeConf``)."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    args: list[tuple[str, str]] = field(default_factory=list)
    capability_args: dict[str, Any] = field(default_factory=dict)


def sandbox_cache_dir(box: Sandbox) -> str:
    """libcni's default cache (``/var/lib/cni``) as the sandbox sees it, reached from the
    host through ``/proc/PID/root`` (which resolves in the sandbox's mount namespace):
    the cache go-cni and Podman write inside the sandbox."""
    return f"/proc/{box.pid}/root/var/lib/cni"


class CNIConfig:
    """libcni's ``CNIConfig``: where plugins are (``path``), where results are cached,
    how plugins run, and the time limit of each plugin run.

    ``cache_dir`` has no default: libcni's ``/var/lib/cni`` would be the host's when this
    runs outside the sandbox; pass :func:`sandbox_cache_dir` or a test directory.
    """

    def __init__(
        self,
        path: Sequence[str],
        cache_dir: str | Path,
        exec: Exec = local_exec,
        timeout: float = 10.0,
    ) -> None:
        self.path = list(path)
        self.cache_dir = Path(cache_dir)
        self.exec = exec
        self.timeout = timeout
        self.log: list[dict[str, Any]] = []  # (command, plugin, stdin) of each run, for tests

    # ---- running one plugin ---------------------------------------------------------
    def find(self, plugin: str) -> str:
        """FindInPath: the first ``CNI_PATH`` directory holding an executable ``plugin``."""
        if not plugin or "/" in plugin:
            raise CNIError(f"invalid plugin name {plugin!r}")
        for d in self.path:
            candidate = os.path.join(d, plugin)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        raise CNIError(f'failed to find plugin "{plugin}" in path {self.path}')

    def _env(self, command: str, rt: RuntimeConf | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=rt.container_id if rt else "",
            CNI_NETNS=rt.netns if rt else "",
            CNI_ARGS=";".join(f"{k}={v}" for k, v in rt.args) if rt else "",
            CNI_IFNAME=rt.ifname if rt else "",
            CNI_PATH=os.pathsep.join(self.path),
        )
        return env

    def _run(self, plugin: str, command: str, conf: dict[str, Any], env: dict[str, str]) -> bytes:
        exe = self.find(plugin)
        stdin = json.dumps(conf).encode()
        self.log.append({"command": command, "plugin": plugin, "stdin": conf})
        try:
            rc, out, err = self.exec([exe], stdin, env, self.timeout)
        except subprocess.TimeoutExpired:
            raise CNIError(
                f"timed out after {self.timeout:g} s", plugin=plugin, command=command
            ) from None
        if rc == 0:
            return out
        stderr = err.decode(errors="replace").strip()
        if not out.strip():
            msg = (
                f"netplugin failed: {stderr!r}"
                if stderr
                else (f"netplugin failed with no error message: exit status {rc}")
            )
            raise CNIError(msg, plugin=plugin, command=command, stderr=stderr)
        try:
            doc = json.loads(out)
        except ValueError:
            raise CNIError(
                f"netplugin failed but error parsing its diagnostic message {out!r}",
                plugin=plugin,
                command=command,
                stderr=stderr,
            ) from None
        code = doc.get("code")
        raise CNIError(
            str(doc.get("msg", "")),
            code=code if isinstance(code, int) else None,
            details=str(doc.get("details", "")),
            plugin=plugin,
            command=command,
            stderr=stderr,
        )

    @staticmethod
    def build_config(
        net: NetworkConfigList,
        plugin: dict[str, Any],
        prev_result: dict[str, Any] | None,
        rt: RuntimeConf | None,
    ) -> dict[str, Any]:
        """libcni ``buildOneConfig``: the plugin's configuration with ``name``,
        ``cniVersion``, ``prevResult`` and the capability-filtered ``runtimeConfig``."""
        conf = dict(plugin)
        conf["name"] = net.name
        conf["cniVersion"] = net.cni_version
        if prev_result is not None:
            conf["prevResult"] = prev_result
        if rt is not None:
            caps = plugin.get("capabilities") or {}
            rc = {
                k: rt.capability_args[k] for k, on in caps.items() if on and k in rt.capability_args
            }
            if rc:
                conf["runtimeConfig"] = rc
        return conf

    # ---- the cache ------------------------------------------------------------------
    def _cache_file(self, net_name: str, rt: RuntimeConf) -> Path:
        if not (net_name and rt.container_id and rt.ifname):
            raise CNIError("cache file path requires network name, container ID and ifname")
        return self.cache_dir / "results" / f"{net_name}-{rt.container_id}-{rt.ifname}"

    def _cache_add(self, result: dict[str, Any], net: NetworkConfigList, rt: RuntimeConf) -> None:
        doc = {
            "kind": CACHE_KIND,
            "containerId": rt.container_id,
            "config": base64.b64encode(net.raw).decode(),
            "ifName": rt.ifname,
            "networkName": net.name,
            "netns": rt.netns,
            "cniArgs": [list(a) for a in rt.args] or None,
            "capabilityArgs": rt.capability_args or None,
            "result": result,
        }
        path = self._cache_file(net.name, rt)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
        tmp.chmod(0o600)
        tmp.replace(path)

    def cached_result(self, net: NetworkConfigList, rt: RuntimeConf) -> dict[str, Any] | None:
        """The cached final ADD result, or None when there is none."""
        try:
            doc = json.loads(self._cache_file(net.name, rt).read_text())
        except (OSError, ValueError):
            return None
        if doc.get("kind") != CACHE_KIND:  # the legacy cache held the bare result
            return doc if isinstance(doc, dict) and "cniVersion" in doc else None
        result = doc.get("result")
        return result if isinstance(result, dict) else None

    def _cache_del(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        with contextlib.suppress(OSError, CNIError):
            self._cache_file(net.name, rt).unlink()

    def cached_attachments(self, container_id: str = "") -> list[dict[str, Any]]:
        """GetCachedAttachments: the cached attachments (all, or one container's)."""
        d = self.cache_dir / "results"
        out: list[dict[str, Any]] = []
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return out
        for name in names:
            try:
                doc = json.loads((d / name).read_text())
            except (OSError, ValueError):
                continue
            if doc.get("kind") != CACHE_KIND or not doc.get("ifName"):
                continue
            if not doc.get("networkName"):
                continue
            if container_id and doc.get("containerId") != container_id:
                continue
            out.append(doc)
        return out

    # ---- operations -----------------------------------------------------------------
    def add_network_list(self, net: NetworkConfigList, rt: RuntimeConf) -> dict[str, Any]:
        for what, value in (("container ID", rt.container_id), ("network name", net.name)):
            if not _NAME_RE.match(value):
                raise CNIError(f"invalid characters found in {what} {value!r}")
        if (
            not rt.ifname
            or len(rt.ifname) > 15
            or rt.ifname in (".", "..")
            or any(c in rt.ifname for c in "/: \t\n")
        ):
            raise CNIError(f"interface name {rt.ifname!r} is not valid")
        result: dict[str, Any] | None = None
        for plugin in net.plugins:
            conf = self.build_config(net, plugin, result, rt)
            out = self._run(plugin["type"], "ADD", conf, self._env("ADD", rt))
            try:
                parsed = json.loads(out or b"{}") or {}
            except ValueError as exc:
                raise CNIError(
                    f"failed to unmarshal raw result: {exc}", plugin=plugin["type"], command="ADD"
                ) from None
            if not parsed.get("cniVersion"):  # libcni fixupResultVersion
                parsed["cniVersion"] = net.cni_version
            result = parsed
        assert result is not None
        self._cache_add(result, net, rt)
        return result

    def check_network_list(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        if not version_at_least(net.cni_version, "0.4.0"):
            raise CNIError(
                f'configuration version "{net.cni_version}" does not support the CHECK command'
            )
        if net.disable_check:
            return
        cached = self.cached_result(net, rt)
        for plugin in net.plugins:
            conf = self.build_config(net, plugin, cached, rt)
            self._run(plugin["type"], "CHECK", conf, self._env("CHECK", rt))

    def del_network_list(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        cached = self.cached_result(net, rt) if version_at_least(net.cni_version, "0.4.0") else None
        for plugin in reversed(net.plugins):
            conf = self.build_config(net, plugin, cached, rt)
            self._run(plugin["type"], "DEL", conf, self._env("DEL", rt))
        self._cache_del(net, rt)

    def get_status_network_list(self, net: NetworkConfigList) -> None:
        if not version_at_least(net.cni_version, "1.1.0"):
            return
        for plugin in net.plugins:
            conf = self.build_config(net, plugin, None, None)
            self._run(plugin["type"], "STATUS", conf, self._env("STATUS", None))

    def gc_network_list(
        self, net: NetworkConfigList, valid: Sequence[tuple[str, str]] | None = None
    ) -> None:
        """GC: ``valid`` is the list of (containerID, ifname) still attached."""
        if net.disable_gc:
            return
        keep = set(valid or [])
        errors: list[CNIError] = []
        for att in self.cached_attachments():
            if att["networkName"] != net.name or (att["containerId"], att["ifName"]) in keep:
                continue
            rt = RuntimeConf(
                att["containerId"],
                att.get("netns", ""),
                att["ifName"],
                [(a[0], a[1]) for a in att.get("cniArgs") or []],
                att.get("capabilityArgs") or {},
            )
            try:
                self.del_network_list(net, rt)
            except CNIError as exc:
                errors.append(exc)
        if version_at_least(net.cni_version, "1.1.0"):
            attachments = [{"containerID": c, "ifname": i} for c, i in valid or []]
            for plugin in net.plugins:
                conf = self.build_config(net, plugin, None, None)
                if valid is not None:
                    conf["cni.dev/valid-attachments"] = attachments
                    conf["cni.dev/attachments"] = attachments
                try:
                    self._run(plugin["type"], "GC", conf, self._env("GC", None))
                except CNIError as exc:
                    errors.append(exc)
        if errors:
            raise CNIError("; ".join(str(e) for e in errors), code=errors[0].code, errors=errors)

    def get_version_info(self, plugin: str) -> dict[str, Any]:
        env = self._env("VERSION", RuntimeConf("", "dummy", "dummy"))
        env["CNI_PATH"] = "dummy"
        out = self._run(plugin, "VERSION", {"cniVersion": CURRENT}, env)
        info: dict[str, Any] = json.loads(out)
        return info

    def validate_network_list(self, net: NetworkConfigList) -> list[str]:
        """ValidateNetworkList: every plugin exists and supports the list's version;
        returns the capabilities the list enables."""
        problems = []
        for plugin in net.plugins:
            info = self.get_version_info(plugin["type"])
            if net.cni_version not in info.get("supportedVersions", []):
                problems.append(
                    f'plugin {plugin["type"]} does not support config version "{net.cni_version}"'
                )
        if problems:
            raise CNIError("; ".join(problems))
        return sorted(
            {k for p in net.plugins for k, on in (p.get("capabilities") or {}).items() if on}
        )
