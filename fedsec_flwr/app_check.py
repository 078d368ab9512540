"""Run an app's run-config check in a process of its own.

``python -m fedsec_flwr.launch`` starts this module as a child process
before it starts anything else. The child imports, from the app's folder,
the check that the app names in ``[tool.fedsec_flwr.launch]
check-run-config``. It calls the check with the run config, read as JSON
from standard input, and writes the outcome as JSON to the file named on
its command line. Whatever
the app's import does (environment variables, loggers, loaded modules,
``SystemExit``) stays in the child.

Usage (by the launcher)::

    python -m fedsec_flwr.app_check SPEC APP_DIR RESULT_FILE [NUM_NODES] \
        < run_config.json

A check that takes a ``num_nodes`` keyword also receives the number of
simulated SuperNodes.

The outcome is ``{"status": STATUS, "message": TEXT}``, with ``STATUS`` one of:

- ``accepted``: the check returned None;
- ``rejected``: the check raised ``ValueError``; the message is its text;
- ``broken``: the check could not be imported or called, returned a value,
  or raised anything else; the message describes the failure.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATUS_ACCEPTED = "accepted"
STATUS_REJECTED = "rejected"
STATUS_BROKEN = "broken"

EXIT_OK = 0
EXIT_USAGE = 2


def run_check(
    spec: str,
    app_dir: Path,
    run_config: Mapping[str, Any],
    num_nodes: int | None = None,
) -> dict[str, str]:
    """Import the function ``spec`` names from ``app_dir`` and call it.

    Args:
        spec: ``"package.module:function"``.
        app_dir: Folder of the app; it goes first on ``sys.path`` and stays
            there, so the check may import the app's modules as it runs.
        run_config: The whole run config.
        num_nodes: Number of simulated SuperNodes, passed as ``num_nodes``
            to a check that takes that keyword.

    Returns:
        The outcome, as described in the module's docstring.
    """
    module_name, function_name = spec.split(":")
    sys.path.insert(0, str(app_dir))
    try:
        module = importlib.import_module(module_name)
    except BaseException as error:  # reported to the launcher, whatever it is
        return _broken(
            f"cannot import {module_name} from {app_dir}: {_describe(error)}"
        )

    shadowed = _shadowing_module(module_name, app_dir)
    if shadowed is not None:
        return _broken(shadowed)

    function = getattr(module, function_name, None)
    if function is None:
        return _broken(f"{module_name} has no attribute {function_name}")
    if not callable(function):
        return _broken(
            f"{module_name}.{function_name} is not callable; found an object of "
            f"type {type(function).__name__}"
        )

    keywords = {}
    if num_nodes is not None and _takes_num_nodes(function):
        keywords["num_nodes"] = num_nodes
    try:
        returned = function(dict(run_config), **keywords)
    except ValueError as error:
        message = str(error) or f"{type(error).__name__} without a message"
        return {"status": STATUS_REJECTED, "message": message}
    except BaseException as error:  # reported to the launcher, whatever it is
        return _broken(f"raised {_describe(error)}")

    if returned is not None:
        if inspect.iscoroutine(returned):
            returned.close()
        return _broken(
            f"returned a {type(returned).__name__}; a check returns None and "
            "raises ValueError to reject the run config"
        )
    return {"status": STATUS_ACCEPTED, "message": ""}


def _takes_num_nodes(function: Any) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "num_nodes" in parameters or any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD
        for parameter in parameters.values()
    )


def _shadowing_module(module_name: str, app_dir: Path) -> str | None:
    """Say so when another module of the same name was imported instead."""
    top_name = module_name.split(".")[0]
    in_app = (app_dir / f"{top_name}.py").is_file() or (app_dir / top_name).is_dir()
    location = getattr(sys.modules.get(top_name), "__file__", None)
    if not in_app or location is None:
        return None
    if Path(location).resolve().is_relative_to(app_dir.resolve()):
        return None
    return (
        f"{top_name} in {app_dir} is hidden by the module of the same name "
        f"at {location}; rename the app's module"
    )


def _broken(message: str) -> dict[str, str]:
    return {"status": STATUS_BROKEN, "message": message}


def _describe(error: BaseException) -> str:
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check that the arguments name and write its outcome."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    num_nodes_given = arguments[3:]
    if len(arguments) not in (3, 4) or not all(a.isdigit() for a in num_nodes_given):
        print(
            "usage: python -m fedsec_flwr.app_check SPEC APP_DIR RESULT_FILE "
            "[NUM_NODES]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    spec, app_dir, result_file = arguments[:3]
    num_nodes = int(num_nodes_given[0]) if num_nodes_given else None

    run_config = json.loads(sys.stdin.read())
    outcome = run_check(spec, Path(app_dir), run_config, num_nodes)
    Path(result_file).write_text(json.dumps(outcome), encoding="utf-8")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
