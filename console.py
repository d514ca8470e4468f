"""One error convention for every console script: user errors in one line (exit 2), internal errors with a traceback.

    @console_main
    def main(argv: list[str] | None = None) -> int | None:
        args = parser.parse_args(argv)
        ...

``console_main`` wraps a ``main(argv)`` that returns an exit code or None (success); the console script's
``sys.exit(main())`` then exits 0 on success, whatever else ``main`` returns (a trainer, a dict), never its repr.
A *user* error (a missing or malformed input file, a model id that is neither a folder nor a Hub repo, an impossible
setting) prints ``<prog>: error: <what and which input>; <what to do>`` on stderr and exits 2, like argparse's own
usage errors. Anything else is a bug and keeps its traceback (exit 1). ``--debug`` anywhere on the command line (it
is taken out before ``main`` parses its arguments, so no parser declares it) or ``GRANVIT_DEBUG=1`` shows the
traceback of user errors too, and keeps the libraries' progress bars, which are otherwise silenced so a command draws
its own. Library warnings are not silenced: one that asks nothing of the user is fixed where it comes from.

What counts as a user error (``user_message``): ``UserError`` (raise it, or use ``load_json`` / ``load_yaml`` /
``check_model_source``); an ``OSError`` naming a path given on the command line (``FileNotFoundError`` and friends);
huggingface_hub's repo-id / not-found / offline errors, also when transformers wraps them in an ``OSError``; a JSON or
YAML decode error. This module is part of the package, never of a checkpoint: the Hub files do not import it.
"""

import functools
import importlib.util
import json
import os
import re
import sys

import huggingface_hub.utils
import transformers
import yaml
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import HFValidationError, validate_repo_id

DEBUG_FLAG = "--debug"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A problem with what the user gave (a file, an id, a setting); the message is the one line they see, so it
    names the input and says what to do."""


# ---- helpers that raise UserError -----------------------------------------------------------------------------------
def load_json(path: str):
    """``json.load`` of a user's file; a missing or malformed file is a ``UserError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix the file or export it again") from err


def load_yaml(path: str):
    """``yaml.safe_load`` of a user's file; a missing or malformed file is a ``UserError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the path") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({_one_line(err)}); fix the file") from err


def check_model_source(value: str, option: str) -> str:
    """``value`` must be an existing local folder or something shaped like a Hub repo id (``name`` or ``owner/name``).

    A path that does not exist would otherwise reach ``from_pretrained`` and fail with a Hub repo-id error. Whether a
    well-formed Hub id exists is left to the download, whose errors ``user_message`` maps too.
    """
    if os.path.isdir(value):
        return value
    if os.path.exists(value):
        raise UserError(f"{option} {value} is a file; pass the checkpoint folder that holds config.json")
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UserError(
            f"{option} {value}: no such folder, and not a Hub repo id (owner/name); check the path"
        ) from None
    return value


# ---- the boundary ---------------------------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _named_inputs(argv: list[str]) -> list[str]:
    """Command-line values that may be paths or ids (``key=value`` overrides contribute their value)."""
    values = []
    for arg in argv:
        if arg.startswith("-"):
            arg = arg.partition("=")[2]
        elif "=" in arg and not os.path.exists(arg):
            arg = arg.partition("=")[2]
        if arg:
            values.append(arg)
    return values


def _under(path: str, inputs: list[str]) -> bool:
    path = os.path.abspath(path)
    for value in inputs:
        given = os.path.abspath(value)
        if path == given or path.startswith(given.rstrip(os.sep) + os.sep):
            return True
    return False


def user_message(err: BaseException, argv: list[str]) -> str | None:
    """The one-line message for a user error, or None when ``err`` is a bug (it then keeps its traceback)."""
    inputs = _named_inputs(argv)

    # A Hub id is named in some messages only; otherwise the command line's one value shaped like owner/name.
    hub_like = [v for v in inputs if "/" in v and not os.path.exists(v)]

    def named(e, default):
        found = [v for v in inputs if re.search(rf"(?<![\w./-]){re.escape(v)}(?![\w./-])", str(e))]
        return next((v for v in found if v in hub_like), found[0] if found else hub_like[0] if hub_like else default)

    for e in _chain(err):
        if isinstance(e, UserError):
            return _one_line(e)
        if isinstance(e, hub_errors.HFValidationError):
            return f"{named(e, 'the model')}: no such folder, and not a Hub repo id (owner/name); check the path"
        if isinstance(e, hub_errors.GatedRepoError):
            return f"{named(e, 'the repo')}: a gated Hub repo; request access on its page and log in (hf auth login)"
        if isinstance(e, hub_errors.RepositoryNotFoundError):
            return f"{named(e, 'the repo')}: no such Hub repo; check the id, or log in (hf auth login) if it is private"
        if isinstance(e, hub_errors.RevisionNotFoundError):
            return f"{named(e, 'the repo')}: no such revision on the Hub; check the branch, tag or commit"
        if isinstance(e, (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError)):
            return (f"{named(e, 'the model')}: not in the local cache and the Hub is not reachable (or HF_HUB_OFFLINE "
                    "is set); download it first or pass a local folder")
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, ConnectionError):  # e.g. datasets' "Couldn't reach 'org/name' on the Hub"
        return f"{_one_line(err)}; check the connection (or HF_HUB_OFFLINE), or pass local files"
    if isinstance(err, OSError) and err.filename is not None and _under(os.fsdecode(err.filename), inputs):
        reason = err.strerror or _one_line(err) or "cannot be read"
        return f"{os.fsdecode(err.filename)}: {reason[0].lower()}{reason[1:]}; check the path"
    text = _one_line(err)
    if isinstance(err, OSError) and err.errno is None and any(text.startswith(v) or f"'{v}'" in text for v in inputs):
        # transformers' loading errors name the id first: "X does not appear to have a file named config.json. ..."
        return text.split(". Checkout")[0]
    if type(err).__name__ == "JSONDecodeError" or type(err).__module__.split(".")[0] == "yaml":
        files = [v for v in inputs if os.path.isfile(v)] or ["an input file"]
        return f"{', '.join(files)}: could not be parsed ({text}); fix the file"
    return None


def _name_deepspeed_accelerator() -> None:
    """Tell DeepSpeed the machine has no accelerator, when it has none, before anything imports DeepSpeed.

    accelerate imports DeepSpeed whenever it is installed (``unwrap_model`` on every ``save_pretrained``), not only
    when a DeepSpeed config is used; on import DeepSpeed probes for an accelerator and warns "Setting accelerator to
    CPU" when it finds none. ``DS_ACCELERATOR`` (DeepSpeed's own setting) gives it the answer it would have reached, so
    it does not probe; a value the user set is kept, and machines with an accelerator are left to DeepSpeed."""
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch  # here only: a DeepSpeed install is what needs the answer, and torch is what knows the devices

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    if not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available()):
        os.environ["DS_ACCELERATOR"] = "cpu"


def _quiet_progress_bars():
    """Silence library progress bars (a command draws its own; ``--debug`` keeps theirs). Library warnings stay: each
    one a command triggers is fixed where it comes from, or asks the user to act. Returns a function that restores the
    previous settings, for mains called in-process (tests)."""
    bars = transformers.logging.is_progress_bar_enabled()
    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    datasets_env = os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS")
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported (later, by the command)
    transformers.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()

    def restore():
        if bars:
            transformers.logging.enable_progress_bar()
        if hub_bars:
            huggingface_hub.utils.enable_progress_bars()
        if datasets_env is None:
            os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = datasets_env

    return restore


def console_main(main):
    """Decorate a console script's ``main(argv)``; see the module docstring. Applying it is one line:

        from granvit.console import console_main

        @console_main
        def main(argv=None): ...
    """

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        argv = [os.fspath(a) for a in (sys.argv[1:] if argv is None else argv)]
        debug = DEBUG_FLAG in argv or os.environ.get("GRANVIT_DEBUG", "").lower() in ("1", "true", "yes")
        argv = [a for a in argv if a != DEBUG_FLAG]
        _name_deepspeed_accelerator()
        restore = None if debug else _quiet_progress_bars()
        try:
            code = main(argv)
        except (Exception, KeyboardInterrupt) as err:
            message = None if debug else user_message(err, argv)
            if message is None:
                raise
            prog = os.path.basename(sys.argv[0]) if os.path.basename(sys.argv[0]).startswith("granvit") else "granvit"
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 130 if isinstance(err, KeyboardInterrupt) else EXIT_USER_ERROR
        finally:
            if restore is not None:
                restore()
        return code if isinstance(code, int) and not isinstance(code, bool) else 0

    return run


__all__ = ["UserError", "check_model_source", "console_main", "load_json", "load_yaml", "user_message"]
