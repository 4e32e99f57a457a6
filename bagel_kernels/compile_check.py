"""Compile every Triton kernel of the package for sm_90 (Hopper) without a GPU.

    python -m bagel_kernels.compile_check [--module NAME ...] [--only SUBSTRING] [-v]

Catches what the interpreter accepts and the GPU compiler rejects (``break`` in a loop, ``tl.exp``
on bf16, shared memory beyond Hopper's 227 KiB, ...). Must run WITHOUT ``TRITON_INTERPRET=1``:
under the interpreter ``@triton.jit`` returns an interpreted function that cannot be compiled
(the script refuses to run then). Exit code 0 when every spec compiles, 1 otherwise.

Registry format
---------------
Each kernel module listed in :data:`MODULES` may define

    def sm90_compile_specs() -> list[tuple]:

returning tuples ``(name, jit_fn, signature, constexprs)`` or
``(name, jit_fn, signature, constexprs, options)``:

    name        str, unique label printed in the report (e.g. "attn_fwd_bf16_d128")
    jit_fn      the ``@triton.jit`` kernel object itself (a ``triton.runtime.JITFunction``)
    signature   dict ``{arg_name: type}`` over ALL kernel arguments, in any order; types are
                Triton type strings: "*bf16", "*fp16", "*fp32", "*i32", "*i64" for pointers,
                "i32", "i64", "fp32" for scalars, and "constexpr" for constexpr arguments
    constexprs  dict ``{arg_name: value}`` for every argument typed "constexpr" (ints, bools,
                strings such as ``DOT_PREC="ieee"``, or ``tl.dtype`` objects)
    options     optional dict of compile options, e.g. ``{"num_warps": 8, "num_stages": 3}``
                (use the launch values, since shared-memory use depends on ``num_stages``), plus
                one key of our own, ``"divisible_by_16"``: the argument names to compile as
                multiples of 16 (see below)

Divisibility: at run time Triton specialises every pointer that is 16-byte aligned and every
integer argument that is a multiple of 16, and the GPU code depends on it (the software pipeliner
only turns loads into cp.async when it can prove 16-byte vectors). So that the checked code is the
code that runs, every pointer argument and every integer argument whose name starts with
``stride`` is compiled as divisible by 16, unless ``options["divisible_by_16"]`` lists the names.

A module that does not exist yet, or has no ``sm90_compile_specs``, is skipped with a note.
Modules are imported by name, so add new ones to :data:`MODULES` (or pass ``--module``).

API notes: recent Triton takes ``ASTSource(fn, signature, constexprs, attrs)`` with constexprs inside
the signature and ``attrs = {(arg_index,): [["tt.divisibility", 16]]}`` (checked on 3.9, the CPU/CI
version; 3.3+ use the same form as far as we know). Older releases wanted the constexprs out of the
signature and keyed by index, which :func:`_ast_source` falls back to (without the hints).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

__all__ = ["MODULES", "SM90_MAX_SHARED", "collect_specs", "compile_spec", "main"]

MODULES = ["bagel_kernels.attention_triton", "bagel_kernels.mot"]  # mot re-exports the specs of mot_triton
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on H100/H200 (227 KiB)


def collect_specs(modules: list[str]) -> tuple[list[tuple], list[str], list[str]]:
    """``(specs, notes, errors)``: every module's specs (as 5-tuples), a note per module skipped
    (absent, or without ``sm90_compile_specs``), and an error per module that failed to load."""
    specs, notes, errors = [], [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                notes.append(f"skip {name}: module not found")
            else:
                errors.append(f"FAIL {name}: import error: {exc}")
            continue
        except Exception as exc:  # a broken module must not hide the others
            errors.append(f"FAIL {name}: import error: {type(exc).__name__}: {exc}")
            continue
        fn = getattr(mod, "sm90_compile_specs", None)
        if fn is None:
            notes.append(f"skip {name}: no sm90_compile_specs()")
            continue
        try:
            mod_specs = list(fn())
        except Exception as exc:
            errors.append(f"FAIL {name}: sm90_compile_specs() raised {type(exc).__name__}: {exc}")
            continue
        short = name.rsplit(".", 1)[-1]
        for spec in mod_specs:
            if len(spec) == 4:
                spec = (*spec, {})
            if len(spec) != 5:
                errors.append(
                    f"FAIL {name}: a spec must be (name, jit_fn, signature, constexprs[, options]), got {len(spec)} items"
                )
                continue
            specs.append((f"{short}:{spec[0]}", *spec[1:]))
    return specs, notes, errors


def _ast_source(fn, signature: dict, constexprs: dict, divisible: list[str] | None = None):
    import triton

    order = list(fn.arg_names)
    missing = [a for a in order if a not in signature]
    if missing:
        raise ValueError(f"signature lacks arguments {missing} of {fn.__name__}")
    extra = [a for a in signature if a not in order]
    if extra:
        raise ValueError(f"signature names unknown arguments {extra} of {fn.__name__}")
    unset = [a for a in order if signature[a] == "constexpr" and a not in constexprs]
    if unset:
        raise ValueError(f"constexpr arguments {unset} of {fn.__name__} have no value")
    sig = {a: signature[a] for a in order}
    if divisible is None:
        divisible = [
            a for a in order if sig[a].startswith("*") or (a.startswith("stride") and sig[a] != "constexpr")
        ]
    attrs = {(order.index(a),): [["tt.divisibility", 16]] for a in divisible}
    try:
        return triton.compiler.ASTSource(fn, sig, dict(constexprs), attrs)
    except (TypeError, AssertionError, KeyError):
        # Triton 3.0/3.1: constexprs out of the signature, constants keyed by argument index
        sig_old = {order.index(a): t for a, t in sig.items() if t != "constexpr"}
        consts = {order.index(a): v for a, v in constexprs.items()}
        return triton.compiler.ASTSource(fn=fn, signature=sig_old, constants=consts)


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def compile_spec(spec: tuple):
    """Compile one 5-tuple spec for sm_90; returns the compiled kernel (raises on failure)."""
    import triton

    _, fn, signature, constexprs, options = spec
    options = dict(options)
    divisible = options.pop("divisible_by_16", None)
    src = _ast_source(fn, signature, constexprs, divisible)
    return triton.compile(src, target=_target(), options=options)


def _shared_bytes(kernel) -> int | None:
    meta = getattr(kernel, "metadata", None)
    shared = getattr(meta, "shared", None)
    if shared is None and isinstance(meta, dict):
        shared = meta.get("shared")
    return None if shared is None else int(shared)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", help="kernel module to check (repeatable; default: MODULES)")
    ap.add_argument("--only", default=None, help="compile only specs whose name contains this substring")
    ap.add_argument("-v", "--verbose", action="store_true", help="print full tracebacks of failures")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "compile_check: unset TRITON_INTERPRET; the interpreter replaces the kernels that must be compiled"
        )
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a 3.9 warning, keeps the 3.6 default

    specs, notes, errors = collect_specs(args.module or MODULES)
    for line in notes + errors:
        print(line)
    if args.only:
        specs = [s for s in specs if args.only in s[0]]
    if not specs:
        print("compile_check: no kernels to compile")
        return 1
    failures = len(errors)
    t_all = time.perf_counter()
    for spec in specs:
        name = spec[0]
        t0 = time.perf_counter()
        try:
            kernel = compile_spec(spec)
        except Exception as exc:  # report every kernel, then fail
            failures += 1
            first = str(exc).strip().splitlines()
            print(f"FAIL {name}: {type(exc).__name__}: {first[0] if first else ''}")
            if args.verbose:
                traceback.print_exc()
            continue
        shared = _shared_bytes(kernel)
        dt = time.perf_counter() - t0
        if shared is not None and shared > SM90_MAX_SHARED:
            failures += 1
            print(
                f"FAIL {name}: needs {shared} B of shared memory, sm_90 allows {SM90_MAX_SHARED} ({dt:.1f} s)"
            )
            continue
        extra = f"shared={shared} B" if shared is not None else "shared=?"
        print(f"OK   {name} ({extra}, {dt:.1f} s)")
    total = time.perf_counter() - t_all
    print(
        f"compile_check: {len(specs) - failures + len(errors)}/{len(specs)} kernels compiled for sm_90 in {total:.1f} s"
        + (f"; {len(errors)} module error(s)" if errors else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
