"""Algorithm bundles: packed deterministically, verified as hostile input, unpacked once, loaded
only from themselves; built-in digests and Ed25519 signatures of digests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from laulima.algorithms.base import Algorithm
from laulima.algorithms.bundle import (
    MAX_BUNDLE_FILES,
    MAX_CONTENT_BYTES,
    Manifest,
    PackedBundle,
    builtin_digest,
    check_requirements,
    generate_signing_key,
    is_builtin,
    load_entry_point,
    pack,
    read_sources,
    sign,
    unpack,
    verify,
    verify_signature,
)
from laulima.errors import AlgorithmError, ConfigurationError, DataError, PolicyError

SLOW_COUNTER = Path(__file__).resolve().parents[1] / "helpers" / "algorithms.py"
SLOW_COUNTER_ENTRY = "algorithms:SlowCounter"

ALGORITHM_BODY = """
from laulima.algorithms.base import Algorithm, Evaluation, Update


class {name}(Algorithm):
    def initial_weights(self, params, seed):
        return {{"w": np.zeros(WIDTH, dtype=np.float32)}}

    def setup(self, ctx):
        self.ctx = ctx

    def train(self, weights, config):
        return Update({{"w": scale(weights["w"])}}, n_samples=1)

    def evaluate(self, weights):
        return Evaluation(n_samples=1)
"""


@pytest.fixture(autouse=True)
def forget_imported_modules() -> Iterator[None]:
    """Bundles loaded by a test (``algorithms``, ``mlpkg`` ...) leave ``sys.modules`` as they found it."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _packed_slow_counter(**kwargs: object) -> PackedBundle:
    return pack(SLOW_COUNTER, SLOW_COUNTER_ENTRY, **kwargs)  # type: ignore[arg-type]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _package(root: Path, name: str = "mlpkg") -> Path:
    """A realistic package: relative and absolute imports between submodules, a subpackage, and
    files a bundle must leave out (docs, data, bytecode, a VCS folder)."""
    pkg = root / name
    _write(pkg / "__init__.py", '"""An algorithm package."""\n')
    _write(pkg / "helpers.py", "def scale(w):\n    return w * 2.0\n")
    _write(pkg / "layers" / "__init__.py", "")
    _write(pkg / "layers" / "dense.py", "WIDTH = 4\n")
    _write(
        pkg / "model.py",
        "import numpy as np\n\nfrom .helpers import scale\nfrom "
        + name
        + ".layers.dense import WIDTH\n"
        + ALGORITHM_BODY.format(name="Net"),
    )
    _write(pkg / "README.md", "docs\n")
    (pkg / "weights.bin").write_bytes(b"\x00\x01")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\x00")
    _write(pkg / ".git" / "config", "[core]\n")
    return pkg


def _tar(*entries: tarfile.TarInfo | tuple[str, bytes]) -> bytes:
    """A hand-made tar: (name, content) pairs for regular files, TarInfo for anything else."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, content = entry
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _link(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


# ---------------------------------------------------------------- pack


def test_identical_sources_give_identical_bundles(tmp_path: Path) -> None:
    first = _packed_slow_counter(requirements=["numpy>=1.26"])
    copy = tmp_path / "elsewhere" / "algorithms.py"
    copy.parent.mkdir()
    shutil.copyfile(SLOW_COUNTER, copy)
    os.utime(copy, (1_000_000, 1_000_000))
    os.chmod(copy, 0o600)
    second = pack(str(copy), SLOW_COUNTER_ENTRY, requirements=["numpy >= 1.26"])
    assert second.data == first.data
    assert second.digest == first.digest == _sha(first.data)


def test_the_archive_is_sorted_and_carries_no_metadata() -> None:
    packed = _packed_slow_counter(version="1.2", requirements=["torch>=2.2,<3", "numpy>=1.26"])
    with tarfile.open(fileobj=io.BytesIO(packed.data), mode="r:") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["manifest.json", "src/algorithms.py"]
    for m in members:
        assert (m.type, m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (tarfile.REGTYPE, 0, 0, 0, "", "", 0o644)
        assert m.pax_headers == {}
    manifest = json.loads(_members(packed.data)["manifest.json"])
    assert manifest == {
        "format": "laulima-bundle/1",
        "name": "algorithms",
        "version": "1.2",
        "entry_point": SLOW_COUNTER_ENTRY,
        "requirements": ["numpy>=1.26", "torch<3,>=2.2"],
        "files": {"algorithms.py": _sha(SLOW_COUNTER.read_bytes())},
    }


def test_one_changed_byte_changes_the_digest(tmp_path: Path) -> None:
    original = _packed_slow_counter()
    source = SLOW_COUNTER.read_bytes()
    changed = tmp_path / "algorithms.py"
    changed.write_bytes(source.replace(b"Adds 1", b"Adds 2", 1))
    assert len(changed.read_bytes()) == len(source)
    packed = pack(changed, SLOW_COUNTER_ENTRY)
    assert packed.digest != original.digest
    with pytest.raises(DataError, match="does not match"):
        verify(packed.data, original.digest)


def test_a_package_bundles_only_its_python_sources(tmp_path: Path) -> None:
    packed = pack(_package(tmp_path), "mlpkg.model:Net", version="3")
    assert sorted(packed.manifest.files) == [
        "mlpkg/__init__.py",
        "mlpkg/helpers.py",
        "mlpkg/layers/__init__.py",
        "mlpkg/layers/dense.py",
        "mlpkg/model.py",
    ]
    assert sorted(s.path for s in packed.skipped) == [
        "mlpkg/.git/",
        "mlpkg/README.md",
        "mlpkg/__pycache__/",
        "mlpkg/weights.bin",
    ]
    assert packed.manifest.name == "mlpkg" and packed.manifest.top_level == "mlpkg"
    assert set(_members(packed.data)) == {"manifest.json"} | {f"src/{p}" for p in packed.manifest.files}


def test_packing_a_module_name_runs_none_of_its_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported.marker"
    pkg = _package(tmp_path / "site-packages", name="sidefx_pkg")
    _write(pkg / "__init__.py", f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    packed = pack("sidefx_pkg", "sidefx_pkg.model:Net")
    assert "sidefx_pkg/model.py" in packed.manifest.files
    # A dotted name bundles the submodule alone, found without running its parent package.
    single = pack("sidefx_pkg.helpers", "helpers:scale")
    assert list(single.manifest.files) == ["helpers.py"]
    assert not marker.exists()
    assert "sidefx_pkg" not in sys.modules


@pytest.mark.parametrize(
    ("entry_point", "requirements", "message"),
    [
        ("os:system", (), "not in the bundle"),
        ("mlpkg.missing:Net", (), "not in the bundle"),
        ("mlpkg.model:Nope", (), "defines no 'Nope'"),
        ("mlpkg.model:Net; rm -rf", (), "expected 'package.module:Class'"),
        ("mlpkg.model:Net", ("numpy>>1",), "'numpy>>1' is not valid PEP 508"),
        ("mlpkg.model:Net", ("evil @ https://example.org/evil.whl",), "names a URL"),
        ("mlpkg.model:Net", "numpy", "not one string"),
    ],
)
def test_pack_refuses_bad_entry_points_and_requirements(
    tmp_path: Path, entry_point: str, requirements: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        pack(_package(tmp_path), entry_point, requirements=requirements)


def test_pack_refuses_links_standard_library_names_and_missing_sources(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    (pkg / "secrets.py").symlink_to("/etc/passwd")
    with pytest.raises(ConfigurationError, match=r"mlpkg/secrets.py is a symbolic link"):
        pack(pkg, "mlpkg.model:Net")
    stdlib_named = _write(tmp_path / "json.py", ALGORITHM_BODY.format(name="Net"))
    with pytest.raises(ConfigurationError, match="standard library"):
        pack(stdlib_named, "json:Net")
    with pytest.raises(ConfigurationError, match="does not exist"):
        pack(tmp_path / "nothing-here", "x:Y")
    (tmp_path / "loose").mkdir()
    with pytest.raises(ConfigurationError, match="without __init__.py"):
        pack(tmp_path / "loose", "loose:Y")
    with pytest.raises(ConfigurationError, match="not found on this Python's path"):
        pack("surely_not_a_module_xyz", "surely_not_a_module_xyz:Y")


# ---------------------------------------------------------------- verify


def test_verify_returns_the_manifest_and_sources(tmp_path: Path) -> None:
    packed = _packed_slow_counter()
    assert verify(packed.data, packed.digest) == packed.manifest
    saved = packed.save(tmp_path / f"{packed.digest}.bundle")
    assert verify(saved, packed.digest) == packed.manifest
    assert read_sources(saved, packed.digest) == {"algorithms.py": SLOW_COUNTER.read_text()}


def test_verify_refuses_a_wrong_or_malformed_digest() -> None:
    packed = _packed_slow_counter()
    with pytest.raises(DataError, match="does not match the expected"):
        verify(packed.data, "0" * 64)
    with pytest.raises(DataError, match="64 lowercase hex"):
        verify(packed.data, packed.digest.upper())


def _tampered(*extra: tarfile.TarInfo | tuple[str, bytes], source: bytes | None = None) -> bytes:
    """The SlowCounter bundle's genuine manifest, its source (or ``source``), then ``extra``."""
    members = _members(_packed_slow_counter().data)
    body = members["src/algorithms.py"] if source is None else source
    return _tar(("manifest.json", members["manifest.json"]), ("src/algorithms.py", body), *extra)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_tampered(source=SLOW_COUNTER.read_bytes() + b"\nimport socket\n"), "algorithms.py: its sha256 differs"),
        (_tampered(("src/extra.py", b"import os\n")), "'src/extra.py' is not listed"),
        (_tampered(("run.sh", b"#!/bin/sh\n")), "'run.sh' is not listed"),
        (_tampered(("src/../evil.py", b"x = 1\n")), "unsafe path"),
        (_tampered(("../evil.py", b"x = 1\n")), "unsafe path"),
        (_tampered(("/etc/cron.d/evil", b"x\n")), "absolute"),
        (_tampered(_link("src/evil.py", tarfile.SYMTYPE, "/etc/passwd")), "symbolic link"),
        (_tampered(_link("src/evil.py", tarfile.LNKTYPE, "src/algorithms.py")), "hard link"),
        (_tampered(_link("src/dev.py", tarfile.CHRTYPE)), "device"),
        (_tampered(_link("src/sub", tarfile.DIRTYPE)), "directory"),
        (_tampered(("src/algorithms.py", b"x = 1\n")), "appears twice"),
        (_tar(("src/algorithms.py", SLOW_COUNTER.read_bytes())), "no manifest.json"),
        (b"definitely not a tar archive", "not an uncompressed tar"),
        (gzip.compress(_packed_slow_counter().data), "not an uncompressed tar"),
    ],
    ids=[
        "edited-file",
        "extra-file",
        "file-outside-src",
        "dotdot-inside",
        "dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "device",
        "directory",
        "duplicate",
        "no-manifest",
        "not-tar",
        "gzip",
    ],
)
def test_verify_refuses_tampered_archives(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        verify(data, _sha(data))


def _with_manifest(**changes: object) -> bytes:
    members = _members(_packed_slow_counter().data)
    manifest = json.loads(members["manifest.json"]) | changes
    return _tar(("manifest.json", json.dumps(manifest).encode()), ("src/algorithms.py", members["src/algorithms.py"]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with_manifest(entry_point="os:system"), "module 'os' is not in the bundle"),
        (_with_manifest(files={"algorithms.py": "0" * 64, "other.py": "0" * 64}), "one package or one module"),
        (_with_manifest(files={}), "non-empty table"),
        (_with_manifest(format="laulima-bundle/9"), "laulima-bundle/1"),
        (_with_manifest(hooks=["post-install"]), "unknown field 'hooks'"),
        (_with_manifest(requirements=["numpy>>1"]), "not valid PEP 508"),
        (_tar(("manifest.json", b'{"name": "a", "name": "b"}')), "duplicate key"),
        (_tar(("manifest.json", b"[1, 2]")), "expected a JSON object"),
    ],
    ids=["entry-outside", "two-top-levels", "no-files", "format", "unknown-field", "requirement", "dup-key", "array"],
)
def test_verify_refuses_bad_manifests(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        verify(data, _sha(data))


def test_verify_bounds_the_number_and_size_of_files() -> None:
    many = _tar(*[(f"src/m{i}.py", b"") for i in range(MAX_BUNDLE_FILES + 2)])  # + manifest.json
    with pytest.raises(DataError, match=f"more than {MAX_BUNDLE_FILES} files"):
        verify(many, _sha(many))
    large = _tar(("src/big.py", b"#" * (MAX_CONTENT_BYTES + 1)))
    with pytest.raises(DataError, match=f"exceed {MAX_CONTENT_BYTES} bytes"):
        verify(large, _sha(large))


# ---------------------------------------------------------------- requirements


def test_requirements_met_by_this_environment_pass() -> None:
    manifest = _packed_slow_counter(
        requirements=["numpy>=1", "pytest", 'surely-absent-pkg-xyz>=1; python_version < "3"']
    ).manifest
    check_requirements(manifest)


def test_a_missing_requirement_names_the_package() -> None:
    manifest = _packed_slow_counter(requirements=["numpy>=1", "surely-absent-pkg-xyz>=1.0"]).manifest
    with pytest.raises(ConfigurationError, match="'surely-absent-pkg-xyz' is not installed") as caught:
        check_requirements(manifest)
    assert caught.value.context["package"] == "surely-absent-pkg-xyz"


def test_an_incompatible_version_names_package_and_installed_version() -> None:
    manifest = _packed_slow_counter(requirements=["numpy<1"]).manifest
    with pytest.raises(ConfigurationError, match=rf"numpy {np.__version__} is installed") as caught:
        check_requirements(manifest)
    assert caught.value.context["installed"] == np.__version__


# ---------------------------------------------------------------- unpack


def test_unpack_extracts_read_only_and_reuses_a_complete_unpack(tmp_path: Path) -> None:
    packed = _packed_slow_counter()
    cache = tmp_path / "cache"
    bundle_dir = unpack(packed.data, packed.digest, cache)
    assert bundle_dir == cache / packed.digest
    source = bundle_dir / "src" / "algorithms.py"
    assert source.read_bytes() == SLOW_COUNTER.read_bytes()
    assert stat.S_IMODE(source.stat().st_mode) & 0o222 == 0
    assert packed.digest in (bundle_dir / ".laulima-unpacked").read_text()
    assert [p.name for p in cache.iterdir()] == [packed.digest]  # no temporary folder left

    inode = source.stat().st_ino
    saved = packed.save(tmp_path / "x.bundle")
    assert unpack(saved, packed.digest, cache) == bundle_dir
    assert source.stat().st_ino == inode


def test_unpack_replaces_a_damaged_or_partial_unpack(tmp_path: Path) -> None:
    packed = _packed_slow_counter()
    cache = tmp_path / "cache"
    source = unpack(packed.data, packed.digest, cache) / "src" / "algorithms.py"
    os.chmod(source.parent, 0o755)
    os.chmod(source, 0o644)
    source.write_text("import socket\n")
    assert unpack(packed.data, packed.digest, cache) == cache / packed.digest
    assert source.read_bytes() == SLOW_COUNTER.read_bytes()

    other = pack(_package(tmp_path), "mlpkg.model:Net")
    partial = cache / other.digest
    _write(partial / "src" / "mlpkg" / "__init__.py", "")  # no marker: an interrupted copy
    unpack(other.data, other.digest, cache)
    assert (partial / "src" / "mlpkg" / "model.py").is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted([packed.digest, other.digest])


def test_unpack_of_a_tampered_bundle_writes_nothing(tmp_path: Path) -> None:
    data = _tampered(("src/extra.py", b"import os\n"))
    with pytest.raises(DataError, match="not listed"):
        unpack(data, _sha(data), tmp_path / "cache")
    with pytest.raises(DataError, match="does not match"):
        unpack(_packed_slow_counter().data, _sha(data), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- load


def test_load_entry_point_imports_slow_counter_from_the_bundle(tmp_path: Path) -> None:
    packed = _packed_slow_counter()
    bundle_dir = unpack(packed.data, packed.digest, tmp_path / "cache")
    cls = load_entry_point(bundle_dir, packed.manifest.entry_point)
    assert cls.__name__ == "SlowCounter" and issubclass(cls, Algorithm)
    assert Path(sys.modules[cls.__module__].__file__ or "").is_relative_to(bundle_dir / "src")
    assert cls().initial_weights({"size": 3}, seed=0)["w"].shape == (3,)


def test_submodules_of_the_bundle_import_normally(tmp_path: Path) -> None:
    packed = pack(_package(tmp_path / "work"), "mlpkg.model:Net")
    bundle_dir = unpack(packed.data, packed.digest, tmp_path / "cache")
    net = load_entry_point(bundle_dir, "mlpkg.model:Net")()
    assert net.initial_weights({}, seed=0)["w"].shape == (4,)  # WIDTH from mlpkg.layers.dense
    for name in ("mlpkg", "mlpkg.helpers", "mlpkg.layers.dense", "mlpkg.model"):
        assert Path(sys.modules[name].__file__ or "").is_relative_to(bundle_dir / "src")
    with pytest.raises(ConfigurationError, match="not a laulima.Algorithm subclass"):
        load_entry_point(bundle_dir, "mlpkg.helpers:scale")


def test_an_entry_point_outside_the_bundle_is_refused_before_any_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "side-effect.marker"
    module = f"sidefx_{uuid.uuid4().hex}"
    _write(tmp_path / "path" / f"{module}.py", f"open({str(marker)!r}, 'w').close()\nclass X: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "path"))
    packed = _packed_slow_counter()
    bundle_dir = unpack(packed.data, packed.digest, tmp_path / "cache")
    antigravity_loaded = "antigravity" in sys.modules
    for entry_point in (f"{module}:X", "os:system", "antigravity:X", "algorithms.os:system"):
        with pytest.raises(PolicyError, match="not part of the algorithm's bundle"):
            load_entry_point(bundle_dir, entry_point)
    assert not marker.exists()
    assert module not in sys.modules
    assert ("antigravity" in sys.modules) == antigravity_loaded


def test_a_bundle_cannot_replace_a_module_already_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shadowed_{uuid.uuid4().hex}"
    _write(tmp_path / "path" / f"{name}.py", "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "path"))
    __import__(name)
    source = _write(tmp_path / "work" / f"{name}.py", "import numpy as np\n" + ALGORITHM_BODY.format(name="Net"))
    packed = pack(source, f"{name}:Net")
    bundle_dir = unpack(packed.data, packed.digest, tmp_path / "cache")
    with pytest.raises(PolicyError, match="already taken"):
        load_entry_point(bundle_dir, f"{name}:Net")


def test_a_failing_bundle_import_names_file_and_line_not_its_message(tmp_path: Path) -> None:
    source = _write(tmp_path / "work" / "crashy.py", "class Net:\n    pass\n\nraise ValueError('/srv/site/secret')\n")
    packed = pack(source, "crashy:Net")
    bundle_dir = unpack(packed.data, packed.digest, tmp_path / "cache")
    with pytest.raises(AlgorithmError, match="ValueError at crashy.py line 4") as caught:
        load_entry_point(bundle_dir, "crashy:Net")
    assert "secret" not in str(caught.value)
    assert "crashy" not in sys.modules


# ---------------------------------------------------------------- built-ins


def test_builtin_digest_is_well_known() -> None:
    entry = "laulima.algorithms.identity:Identity"
    assert builtin_digest(entry) == _sha(b"laulima-builtin/1\nlaulima.algorithms.identity:Identity\n")
    with pytest.raises(ConfigurationError, match="not a built-in"):
        builtin_digest("os:system")


def test_is_builtin_only_for_existing_laulima_algorithms_and_imports_nothing() -> None:
    before = set(sys.modules)
    assert is_builtin("laulima.algorithms.identity:Identity")
    assert is_builtin("laulima.algorithms.segmentation.algorithm:UNetSegmentation")
    for entry in (
        "laulima.algorithms.identity:Nope",
        "laulima.algorithms.nope:X",
        "laulima.core.weights:Weights",
        "os:system",
        "laulima.algorithms.identity",
    ):
        assert not is_builtin(entry), entry
    assert set(sys.modules) == before


# ---------------------------------------------------------------- signatures


def test_signatures_bind_a_digest_to_a_key() -> None:
    digest = _packed_slow_counter().digest
    key, other = generate_signing_key(), generate_signing_key()
    assert key.private_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert key.public_pem.startswith("-----BEGIN PUBLIC KEY-----")
    signature = sign(digest, key.private_pem)
    assert verify_signature(digest, signature, key.public_pem)
    assert not verify_signature(digest, signature, other.public_pem)
    assert not verify_signature(_sha(b"another bundle"), signature, key.public_pem)
    tampered = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert not verify_signature(digest, tampered, key.public_pem)


def test_raw_keys_work_and_bad_keys_or_signatures_are_named() -> None:
    key = generate_signing_key()
    private = serialization.load_pem_private_key(key.private_pem.encode(), password=None)
    raw_private = private.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw_public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = _sha(b"bundle")
    assert verify_signature(digest, sign(digest, raw_private), raw_public)
    assert verify_signature(digest, sign(digest, key.private_pem.encode()), key.public_pem.encode())

    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigurationError, match="not an Ed25519 key"):
        sign(digest, ec_pem)
    with pytest.raises(ConfigurationError, match="not a PEM public key"):
        verify_signature(digest, "0" * 128, "not a key")
    with pytest.raises(DataError, match="128 lowercase hex"):
        verify_signature(digest, "zz", key.public_pem)
    with pytest.raises(ConfigurationError, match="64 lowercase hex"):
        sign("not-a-digest", key.private_pem)


def test_manifest_is_a_frozen_value() -> None:
    manifest = _packed_slow_counter().manifest
    assert isinstance(manifest, Manifest)
    with pytest.raises(AttributeError):
        manifest.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        manifest.files["algorithms.py"] = "0" * 64  # type: ignore[index]


def test_pack_without_an_entry_point_finds_the_one_algorithm_class(tmp_path):
    from laulima.algorithms.bundle import pack

    package = tmp_path / "found"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "util.py").write_text("class Helper:\n    pass\n")
    (package / "model.py").write_text(
        "import laulima\n\n\nclass _Base(laulima.Algorithm):\n    pass\n\n\n"
        "class Net(_Base, laulima.Algorithm):\n    pass\n"
    )
    assert pack(package).manifest.entry_point == "found.model:Net"


def test_pack_without_an_entry_point_names_the_candidates_when_there_are_several(tmp_path):
    from laulima.algorithms.bundle import pack

    module = tmp_path / "two.py"
    module.write_text(
        "from laulima import Algorithm\n\n\nclass A(Algorithm):\n    pass\n\n\nclass B(Algorithm):\n    pass\n"
    )
    with pytest.raises(ConfigurationError, match=r"two:A, two:B.*--entry-point"):
        pack(module)
    (tmp_path / "none.py").write_text("class A:\n    pass\n")
    with pytest.raises(ConfigurationError, match="no public class deriving from laulima.Algorithm"):
        pack(tmp_path / "none.py")
