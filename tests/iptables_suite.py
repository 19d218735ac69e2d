"""iptables' own extension tests (the .t files of iptables' extensions/ directory,
kept in tests/iptables-tests; README.md there describes the format) run twice: by
the kernel's legacy iptables/ip6tables in one scratch namespace, and through
bpfilter (`bpfilter exec -- ip6tables-legacy ...`, a private service) in another.

Every test line is applied to each of its chains as iptables-test.py applies it
(`-A`, then `-save`, then `-D` the same rule), one chain at a time, both sides
running the same shell script. What each side did is then judged (classify()):

  ok              both accepted it, and `-save` printed the same table (and -D worked)
  unsupported     the kernel accepted it, bpfilter refused it with EOPNOTSUPP and a
                  message naming the chain, the rule and the extension (or the table,
                  for tables bpfilter does not have)
  kernel-refused  the kernel refused it, and so did bpfilter: with iptables' same words
                  and exit code, or, for an extension bpfilter does not have, by
                  refusing that extension
  failed          anything else

and, for the family the file was written for, whether the kernel did what the .t line
expects (its RESULT and SAVED text): the files come from a newer iptables than the
binaries, so disagreements are collected, not failed, for the test to compare with
the ones it expects.

libipt_* and iptables.t are iptables' files, libip6t_* ip6tables', libxt_* both
families' (iptables-test.py runs them with iptables only; they are run with ip6tables
as well, where they exercise what bpfilter has for both families).

`python3 tests/iptables_suite.py [FILE.t ...]` runs files and prints the table.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bpfilter.model import Family
from bpfilter_lab import namespaces

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
# a copy of iptables' own .t files is kept with the tests (SOURCE.txt there says whence)
SUITE_CANDIDATES = (os.environ.get("BPFILTER_IPTABLES_TESTS", ""),
                    os.path.join(HERE, "iptables-tests"))

V4, V6 = Family.IPV4, Family.IPV6
TOOLS = {V4: ("iptables-legacy", "iptables-legacy-save"),
         V6: ("ip6tables-legacy", "ip6tables-legacy-save")}
INVERSE = {"OK": "FAIL", "FAIL": "OK", "NOMATCH": "OK"}


def suite_dir() -> str:
    for path in SUITE_CANDIDATES:
        if path and os.path.isfile(os.path.join(path, "README.md")):
            return os.path.realpath(path)
    raise FileNotFoundError(f"iptables' .t files are in none of {SUITE_CANDIDATES}")


def suite_files(root: "str | None" = None) -> list[str]:
    """Every .t file, the top level's then ip6/'s, by name."""
    root = root or suite_dir()
    top = sorted(f for f in os.listdir(root) if f.endswith(".t"))
    six = sorted(f"ip6/{f}" for f in os.listdir(os.path.join(root, "ip6")) if f.endswith(".t"))
    return top + six


def families_of(name: str) -> tuple[Family, ...]:
    """The families a file is run for, the one it was written for first."""
    base = os.path.basename(name)
    if base.startswith("libip6t_"):
        return (V6,)
    if base.startswith("libxt_"):
        return (V4, V6)
    return (V4,)


# ---------------------------------------------------------------- the .t format

@dataclass(frozen=True)
class Line:
    lineno: int
    table: str
    chains: tuple[str, ...]
    rule: str
    saved: str         # what iptables-save must print after "-A CHAIN " ("=": the rule)
    result: str        # OK, FAIL or NOMATCH, for the legacy backend


@dataclass(frozen=True)
class External:
    """A `@cmd` or `%cmd` line: run as it is, in the namespace, where it stands."""
    lineno: int
    command: str


def parse(text: str) -> list:
    """The test lines and external commands of a .t file, in order."""
    items: list = []
    table, chains = "filter", ()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\n")
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith(":"):
            chains = tuple(line[1:].strip().split(","))
        elif line.startswith("*"):
            table = line[1:].strip()
        elif line[0] in "@%":
            items.append(External(lineno, line[1:].strip()))
        else:
            if not chains:
                raise ValueError(f"line {lineno}: a test line before any :CHAIN line")
            fields = line.split(";")
            if len(fields) < 3:
                raise ValueError(f"line {lineno}: not RULE;SAVED;RESULT: {line!r}")
            rule, saved, result = fields[0], fields[1], fields[2].strip()
            if len(fields) > 3 and fields[3].strip() != "LEGACY":
                # scoped to nft: legacy gets the alternative, or the inverse
                alt = fields[4].strip() if len(fields) > 4 else ""
                result = alt if alt else INVERSE[result]
            if result not in ("OK", "FAIL", "NOMATCH"):
                raise ValueError(f"line {lineno}: unknown result {result!r}")
            items.append(Line(lineno, table, chains, rule, rule if saved == "=" else saved,
                                  result))
    return items


# ---------------------------------------------------------------- running

@dataclass
class Step:
    """What one side did with one test line in one chain."""
    rc: int
    err: str
    before: str          # `-S CHAIN` before the -A: the rules already there
    save: str = ""       # `-save -t TABLE` after it, when it was accepted
    delete_rc: int = 0   # the -D of the same rule


def _script(items: list, family: Family, outdir: str) -> str:
    tool, save = TOOLS[family]
    lines = ["set -u", f"cd {shlex.quote(outdir)}"]
    for i, item in enumerate(items):
        if isinstance(item, External):
            command = item.command
            # iptables-test.py runs `iptables ...` lines with the binary under test
            command = re.sub(r"^(ip6?tables)(?= )", tool, command)
            lines.append(f"{command} >{i}.out 2>&1; echo $? >{i}.rc")
            continue
        for j, chain in enumerate(item.chains):
            at, where = f"{i}.{j}", f"-t {item.table}"
            lines += [
                f"{tool} {where} -S {chain} >{at}.before 2>/dev/null",
                f"{tool} {where} -A {chain} {item.rule} >/dev/null 2>{at}.err; echo $? >{at}.rc",
                f'if [ "$(cat {at}.rc)" = 0 ]; then {save} {where} >{at}.save 2>&1; '
                f"{tool} {where} -D {chain} {item.rule} >/dev/null 2>&1; echo $? >{at}.delrc; fi",
            ]
    return "\n".join(lines) + "\n"


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return default


def _strip_save(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def _collect(items: list, outdir: str) -> dict:
    """{(item index, chain index): Step}, and {item index: rc} for external commands."""
    steps, externals = {}, {}
    for i, item in enumerate(items):
        if isinstance(item, External):
            externals[i] = int(_read(f"{outdir}/{i}.rc", "-1"))
            continue
        for j in range(len(item.chains)):
            at = f"{outdir}/{i}.{j}"
            rc = _read(f"{at}.rc")
            if not rc:
                raise RuntimeError(f"{outdir}: no outcome for line {item.lineno}, chain "
                                   f"{item.chains[j]}: the script stopped early")
            steps[i, j] = Step(int(rc), _read(f"{at}.err"), _read(f"{at}.before"),
                               _strip_save(_read(f"{at}.save")), int(_read(f"{at}.delrc", "0")))
    return {"steps": steps, "externals": externals}


@dataclass
class Side:
    """How to run a script in a namespace: the kernel's binaries, or under bpfilter."""
    name: str
    env: dict
    via_bpfilter: bool

    def run(self, ns: str, script: str, timeout: float = 600) -> None:
        argv = ["ip", "netns", "exec", ns]
        if self.via_bpfilter:
            argv += [PY, "-m", "bpfilter", "exec", "--"]
        done = subprocess.run([*argv, "sh", script], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{self.name}: {script} exited {done.returncode}: {done.stderr}")


def run_file(path: str, family: Family, kernel: Side, bpfilter: Side, workdir: str) -> "FileResult":
    """One .t file for one family, on both sides, each in a namespace of its own."""
    with open(path) as f:
        items = parse(f.read())
    job = tempfile.mkdtemp(prefix=f"{os.path.basename(path)}-{family.name}-", dir=workdir)
    outs = {}
    for side in (kernel, bpfilter):
        ns = f"bpft-t-{uuid.uuid4().hex[:8]}"
        namespaces.add(ns)
        try:
            with namespaces.netlink(ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            outdir = os.path.join(job, side.name)
            os.mkdir(outdir)
            script = outdir + ".sh"
            with open(script, "w") as f:
                f.write(_script(items, family, outdir))
            # each job its own xtables lock: jobs run side by side
            run = dataclasses.replace(side, env=dict(side.env, XTABLES_LOCKFILE=outdir + ".lock"))
            run.run(ns, script)
        finally:
            namespaces.delete(ns)
        outs[side.name] = _collect(items, outdir)
    return classify(path, family, items, outs[kernel.name], outs[bpfilter.name])


# ---------------------------------------------------------------- judging

@dataclass
class Case:
    lineno: int
    chain: str
    rule: str
    outcome: str          # ok, unsupported, kernel-refused, failed
    why: str = ""         # failed: what went wrong; unsupported: the extension's refusal


@dataclass
class FileResult:
    file: str
    family: Family
    cases: list[Case] = field(default_factory=list)
    # (line, chain, what): the kernel did not do what the .t line expects
    t_disagreements: list[tuple[int, str, str]] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for c in self.cases if c.outcome == outcome)


# The shim prints the service's reason for a refusal, "bpfilter: <message> (ERRNO)":
# for a rule, "chain C rule N (entry E): match 'x' ..." or "... target 'X' ...".
REASON = re.compile(r"^bpfilter: (?P<message>.*) \((?P<errno>E[A-Z0-9]+)\)$", re.M)
RULE_REFUSAL = re.compile(r"^chain (?P<chain>\S+) rule (?P<rule>\d+) \(entry \d+\): "
                          r"(?P<kind>match|target) '(?P<name>[^']*)' (?P<why>.*?)"
                          r"(?:; the whole table is refused)?$")
TABLE_REFUSAL = re.compile(r"^\S+ table '(?P<table>[^']+)' ")
# what the binaries print when the extension is not in the kernel (no GET_REVISION)
NO_EXTENSION = re.compile(r"^Warning: Extension \S+ (revision 0 )?(is )?not supported, "
                          r"missing kernel module\?\n", re.M)


def _reasons(err: str) -> list[tuple[str, str]]:
    return [(m.group("message"), m.group("errno")) for m in REASON.finditer(err)]


def _without_reasons(err: str) -> str:
    return "".join(line for line in err.splitlines(keepends=True)
                   if not line.startswith("bpfilter: "))


def _unsupported(line: Line, chain: str, step: Step) -> "str | None":
    """The extension (or table) bpfilter refused this rule for, as the summary names it,
    or None when the refusal is not a proper one: EOPNOTSUPP, naming the chain, the
    rule the -A added and the extension."""
    for message, err in _reasons(step.err):
        m = TABLE_REFUSAL.match(message)
        if m and m.group("table") == line.table != "filter":
            return f"table {line.table}"
        m = RULE_REFUSAL.match(message)
        if not m or err not in ("EOPNOTSUPP", "ENOTSUP"):    # one errno, two names
            continue
        position = 1 + sum(1 for rule in step.before.splitlines() if rule.startswith("-A "))
        if m.group("chain") == chain and int(m.group("rule")) == position:
            # the reason's first clause, without the revision number or where a module is
            why = re.split(r": | \(/", re.sub(r"^revision \d+", "revision N", m.group("why")), 1)[0]
            return f"{m.group('kind')} {m.group('name')}: {why}"
    return None


def classify(path: str, family: Family, items: list, kernel: dict, ours: dict) -> FileResult:
    result = FileResult(os.path.relpath(path, suite_dir()), family)
    native = families_of(path)[0] == family
    for i, item in enumerate(items):
        if isinstance(item, External):
            if kernel["externals"][i] == 127 or ours["externals"][i] == 127:
                result.cases.append(Case(item.lineno, "", item.command, "failed",
                                         "an external command is missing (exit 127)"))
            continue
        for j, chain in enumerate(item.chains):
            k, b = kernel["steps"][i, j], ours["steps"][i, j]
            case = Case(item.lineno, chain, item.rule, "failed")
            if k.rc == 0 and b.rc == 0:
                if b.save != k.save:
                    case.why = f"-save differs:\n--- kernel\n{k.save}--- bpfilter\n{b.save}"
                elif b.delete_rc != k.delete_rc:
                    case.why = f"-D exited {b.delete_rc}, the kernel's {k.delete_rc}"
                elif _reasons(b.err):
                    case.why = f"accepted with a message: {b.err}"
                else:
                    case.outcome = "ok"
            elif k.rc == 0:
                refused = _unsupported(item, chain, b)
                if refused:
                    case.outcome, case.why = "unsupported", refused
                else:
                    case.why = f"bpfilter refused what the kernel accepts (exit {b.rc}):\n{b.err}"
            elif b.rc == 0:
                case.why = f"bpfilter accepted what the kernel refuses (exit {k.rc}):\n{k.err}"
            elif _unsupported(item, chain, b):
                case.outcome = "kernel-refused"     # an extension bpfilter does not check
            elif (b.rc, _without_reasons(b.err)) == (k.rc, k.err):
                case.outcome = "kernel-refused"
            else:
                case.why = (f"refused otherwise: kernel exit {k.rc}:\n{k.err}"
                            f"bpfilter exit {b.rc}:\n{b.err}")
            result.cases.append(case)
            if native:
                what = _t_disagreement(item, chain, k)
                if what:
                    result.t_disagreements.append((item.lineno, chain, what))
    return result


def _t_disagreement(line: Line, chain: str, k: Step) -> "str | None":
    """What the kernel (with this iptables) did that the .t line does not expect: as
    iptables-test.py judges it, the SAVED text searched for in -save's output."""
    if line.result == "FAIL":
        return None if k.rc else "accepted, the .t file expects FAIL"
    if k.rc:
        return f"refused ({_first_line(k.err)}), the .t file expects {line.result}"
    found = f"{chain} {line.saved}" in k.save
    if line.result == "OK" and not found:
        saved = [rule for rule in k.save.splitlines() if rule.startswith(f"-A {chain} ")]
        return f"saved as {saved[-1] if saved else 'nothing'!r}"
    if line.result == "NOMATCH" and found:
        return "saved as the .t file says it must not"
    return None


def _first_line(text: str) -> str:
    lines = NO_EXTENSION.sub("", text).strip().splitlines()
    return lines[0] if lines else ""


# ---------------------------------------------------------------- the whole suite

def run_suite(files: list[str], families: "tuple[Family, ...]", kernel: Side, bpfilter: Side,
              workdir: str, workers: int = 2) -> list[FileResult]:
    root = suite_dir()
    jobs = [(os.path.join(root, f), family) for f in files for family in families_of(f)
            if family in families]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_file(*job, kernel, bpfilter, workdir), jobs))


def summary(results: list[FileResult]) -> str:
    head = f"{'file':<34} {'family':<6} {'ok':>4} {'unsupported':>11} {'kernel-refused':>14} " \
           f"{'failed':>6}"
    rows = [head, "-" * len(head)]
    totals = [0, 0, 0, 0]
    for r in results:
        counts = [r.count(o) for o in ("ok", "unsupported", "kernel-refused", "failed")]
        totals = [a + b for a, b in zip(totals, counts)]
        rows.append(f"{r.file:<34} {r.family.name.lower():<6} {counts[0]:>4} {counts[1]:>11} "
                    f"{counts[2]:>14} {counts[3]:>6}")
    rows += ["-" * len(head), f"{'total':<34} {'':<6} {totals[0]:>4} {totals[1]:>11} "
                              f"{totals[2]:>14} {totals[3]:>6}"]
    return "\n".join(rows)


def unsupported_summary(results: list[FileResult]) -> dict[str, set[str]]:
    """{family name: the refusals of what the kernel accepts}, by extension."""
    out: dict[str, set[str]] = {}
    for r in results:
        for c in r.cases:
            if c.outcome == "unsupported":
                out.setdefault(r.family.name, set()).add(c.why)
    return out


def t_disagreements(results: list[FileResult]) -> set[tuple[str, int, str, str]]:
    """(file, line, chain, what the kernel did) where that is not what the line expects."""
    return {(r.file, lineno, chain, what) for r in results
            for lineno, chain, what in r.t_disagreements}


def failures(results: list[FileResult]) -> list[str]:
    return [f"{r.file} ({r.family.name}) line {c.lineno} {c.chain} `{c.rule}`: {c.why}"
            for r in results for c in r.cases if c.outcome == "failed"]


def main(argv: list[str]) -> int:
    sys.path.insert(0, HERE)
    from test_service import Service

    files = argv or suite_files()
    service = Service()
    service.start()
    try:
        kernel = Side("kernel", dict(service.env), via_bpfilter=False)
        ours = Side("bpfilter", dict(service.env), via_bpfilter=True)
        results = run_suite(files, (V4, V6), kernel, ours, service.dir)
    finally:
        service.close()
    print(summary(results))
    for family, refusals in sorted(unsupported_summary(results).items()):
        print(f"\nunsupported, {family}:")
        print("\n".join(f"  {r}" for r in sorted(refusals)))
    print("\nthe kernel, with these binaries, not as the .t files expect:")
    print("\n".join(f"  {d}" for d in sorted(t_disagreements(results))))
    print("\n".join(["", *failures(results)]))
    return 1 if failures(results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
