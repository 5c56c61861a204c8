"""Show that claim tests fail when the claim is broken: a sample of one-line mutations.

Each row names a test of ``tests/test_claims_proofs.py``, and a one-line
change to the production code that breaks the claim the test proves. The
script copies the repository to a scratch folder (never touching the
worktree it runs from), checks that every sampled test passes there
unmutated, then for each row applies the mutation, runs that one test,
records the first failure line, and reverts. It prints a Markdown table
for ``docs/testing.md`` and exits 1 if a mutant survives.

Usage (from the repository, after ``make .venv/.installed-test``)::

    .venv/bin/python mutate/claims_sample.py [--scratch /tmp/claims-sample] [--extra]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
TESTS = "tests/test_claims_proofs.py"


class Mutation(NamedTuple):
    """A one-line change that breaks a claim, and the test that must catch it."""

    claim: str
    test: str
    path: str
    before: str
    after: str


SAMPLE = [
    Mutation("fresh random nonces on every layer",
             "test_fresh_random_nonces_on_every_layer",
             "keyring_hardened/envelope.py",
             "    nonce = rng(NONCE_LEN)",
             "    nonce = bytes(NONCE_LEN)"),
    Mutation("rekey verifies before commit",
             "test_rekey_verifies_before_commit[vault key]",
             "keyring_hardened/keys.py",
             "            ok = hmac.compare_digest(bytes(check), bytes(new_material))",
             "            ok = True"),
    Mutation("RootKey.close wipes its keys",
             "test_rootkey_close_wipes_every_buffer",
             "keyring_hardened/rootkey.py",
             "        for buf in (self._wrap_key, self._verifier_key):",
             "        for buf in ():"),
    Mutation("VaultKeys.close wipes its keys",
             "test_vaultkeys_close_wipes_every_buffer",
             "keyring_hardened/rootkey.py",
             "        for buf in (self._record_key, self.audit_key, self.identifier_key, "
             "self._past_key):",
             "        for buf in ():"),
    Mutation("passphrases are NFC-normalised",
             "test_passphrases_are_nfc_normalised[nfd]",
             "keyring_hardened/rootkey.py",
             '    password = unicodedata.normalize("NFC", passphrase).encode("utf-8", '
             '"surrogatepass")',
             '    password = passphrase.encode("utf-8", "surrogatepass")'),
    Mutation("default KDF is RFC 9106's second recommendation",
             "test_default_kdf_parameters_are_rfc9106_second_recommendation_and_owasp_pbkdf2",
             "keyring_hardened/rootkey.py",
             'ARGON2_DEFAULT = {"memory_kib": 65536, "iterations": 3, "lanes": 4}',
             'ARGON2_DEFAULT = {"memory_kib": 19456, "iterations": 2, "lanes": 1}'),
    Mutation("purge truncates the WAL",
             "test_purge_zeroes_freed_pages_and_truncates_the_wal",
             "keyring_hardened/store.py",
             '            self._checkpoint("purge")',
             "            pass"),
    Mutation("audit chain encoding as documented (UTF-8 JSON)",
             "test_audit_chain_encoding_and_genesis_recomputed_from_the_documented_format",
             "keyring_hardened/audit.py",
             '_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode',
             '_ENCODE = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode'),
    Mutation("hashed identifiers in sinks and exports",
             "test_hashed_identifiers_never_show_names_in_sinks_or_exports",
             "keyring_hardened/audit.py",
             '    digest = hmac.new(bytes(key), name.encode("utf-8"), hashlib.sha256)'
             '.digest()[:16]',
             '    digest = hmac.new(bytes(key), name.encode("utf-8"), hashlib.sha256)'
             '.digest()[:8]'),
    Mutation("sink files are 0600 whatever the umask",
             "test_sink_checkpoint_and_export_files_are_0600_whatever_the_umask",
             "keyring_hardened/sinks.py",
             "                      private=False)",
             "                      private=False, mode=0o644)"),
]

#: More rows, run with ``--extra``: the rest of the claims, one mutation each.
EXTRA = [
    Mutation("a process opened before a rekey refuses an old-root KEK",
             "test_process_opened_before_rekey_never_loads_a_kek_under_the_old_root_key",
             "keyring_hardened/session.py",
             '                raise IntegrityError(f"key version {record.version} failed its '
             'integrity "',
             '                continue; raise IntegrityError(f"key version {record.version} '
             'failed its integrity "'),
    Mutation("a process opened before a rekey goes on with the new key file",
             "test_process_opened_before_rekey_rereads_the_new_key_file_and_goes_on",
             "keyring_hardened/session.py",
             "            if exc.reason != \"root-replaced\" or not self._reunlock():",
             "            if True:"),
    Mutation("a process picks up KEK versions another process added",
             "test_process_opened_before_picks_up_kek_versions_another_process_added",
             "keyring_hardened/session.py",
             "        if version not in self._keks:",
             "        if False:"),
    Mutation("a damaged wrapped vault key is integrity, not locked",
             "test_damaged_wrapped_vault_key_is_integrity_not_locked",
             "keyring_hardened/session.py",
             '            exc = IntegrityError("the vault key failed its integrity check; '
             'restore the vault "',
             '            exc = LockedError("the vault key failed its integrity check; '
             'restore the vault "'),
    Mutation("Kek.wipe zeroes its material",
             "test_kek_wipe_zeroes_its_material",
             "keyring_hardened/envelope.py",
             "        _aead.wipe(self._material)",
             "        pass"),
    Mutation("Session.close wipes every key it holds",
             "test_session_close_wipes_every_key_it_holds",
             "keyring_hardened/session.py",
             "                    self._ident_key[i] = 0",
             "                    pass"),
    Mutation("config refuses KDF parameters below OWASP's floor",
             "test_config_refuses_kdf_parameters_below_the_owasp_floor",
             "keyring_hardened/config.py",
             '        "argon2_iterations": _int(OWASP_ARGON2_FLOOR["iterations"], 100, _FLOOR),',
             '        "argon2_iterations": _int(1, 100, _FLOOR),'),
    Mutation("stored KDF parameters out of range are exit 3",
             "test_stored_kdf_parameters_out_of_range_are_refused_exit_3",
             "keyring_hardened/rootkey.py",
             "            if params.in_range():",
             "            if True:"),
    Mutation("failed unlocks keep their original time",
             "test_failed_unlocks_are_chained_with_their_original_time",
             "keyring_hardened/session.py",
             "                    event = audit.Event(seq + 1, min(max(ts_us, floor), "
             "max(ceiling, floor)),",
             "                    event = audit.Event(seq + 1, max(ceiling, floor),"),
    Mutation("failed unlocks older than the newest event are clamped to it",
             "test_failed_unlocks_older_than_the_newest_event_are_clamped_to_it",
             "keyring_hardened/session.py",
             "                    event = audit.Event(seq + 1, min(max(ts_us, floor), "
             "max(ceiling, floor)),",
             "                    event = audit.Event(seq + 1, min(ts_us, max(ceiling, floor)),"),
    Mutation("-wal and -shm files are 0600 whatever the umask",
             "test_wal_and_shm_files_are_0600_whatever_the_umask",
             "keyring_hardened/storage.py",
             "            os.fchmod(fd, 0o600)  # whatever the umask; SQLite gives its "
             "-wal/-shm the same mode",
             "            os.fchmod(fd, 0o644)"),
    Mutation("purge zeroes freed pages",
             "test_purge_zeroes_freed_pages_and_truncates_the_wal",
             "keyring_hardened/storage.py",
             '            conn.execute("PRAGMA secure_delete = ON")',
             '            conn.execute("PRAGMA secure_delete = OFF")'),
    Mutation("replay of a whole older copy is caught by a checkpoint",
             "test_replay_of_a_whole_older_vault_copy_is_caught_by_a_checkpoint",
             "keyring_hardened/trail.py",
             "    if found.mac != mac:",
             "    if False:"),
    Mutation("get_credential(service, None) returns the most recently updated",
             "test_get_credential_without_username_returns_the_most_recently_updated",
             "keyring_hardened/store.py",
             "            heads.sort(key=lambda h: (h.updated_at, h.id), reverse=True)",
             "            heads.sort(key=lambda h: (h.created_at, h.id), reverse=True)"),
    Mutation("one opaque message across integrity failure kinds",
             "test_one_opaque_message_across_integrity_failure_kinds[aead layer]",
             "keyring_hardened/session.py",
             '            raise IntegrityError(f"{_label(head.service, head.username)}: '
             'integrity check "',
             '            raise IntegrityError(f"{_label(head.service, head.username)}: '
             '{reason} check "'),
    Mutation("arguments refused before the vault is touched are not audited",
             "test_arguments_refused_before_the_vault_is_touched_are_not_audited",
             "keyring_hardened/store.py",
             '        _check_name("service", service, allow_empty=False)\n'
             '        _check_name("username", username, allow_empty=True)\n'
             "        _check_version(version)\n",
             '        _check_name("username", username, allow_empty=True)\n'
             "        _check_version(version)\n"),
]


class Result(NamedTuple):
    """What one mutant run showed."""

    mutation: Mutation
    line: int
    failed: bool
    failure: str


def _copy(scratch: Path) -> None:
    if scratch.resolve().is_relative_to(REPO) or REPO.is_relative_to(scratch.resolve()):
        sys.exit(f"refusing to use {scratch}: it overlaps the repository")
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(REPO, scratch, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", "*.egg-info"))


def _pytest(scratch: Path, *tests: str) -> subprocess.CompletedProcess[str]:
    # The repository's venv, with the scratch copy first on the path: the CLI
    # processes the tests start inherit PYTHONPATH, so they run the mutant too.
    env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(  # noqa: S603 - our own interpreter and fixed arguments
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
         *(f"{TESTS}::{t}" for t in tests)],
        cwd=scratch, env=env, capture_output=True, text=True, check=False, timeout=900)


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("E "):
            return line[1:].strip()
    return next((line for line in output.splitlines() if "FAILED" in line or "Error" in line),
                "(no failure line)")


def _run(scratch: Path, mutation: Mutation) -> Result:
    path = scratch / mutation.path
    original = path.read_text()
    if original.count(mutation.before) != 1:
        sys.exit(f"{mutation.path}: the line to mutate is not there exactly once: "
                 f"{mutation.before!r}")
    line = original[:original.index(mutation.before)].count("\n") + 1
    path.write_text(original.replace(mutation.before, mutation.after))
    try:
        done = _pytest(scratch, mutation.test)
    finally:
        path.write_text(original)
    return Result(mutation, line, done.returncode != 0, _first_failure(done.stdout))


def _cell(text: str) -> str:
    return "`" + " ".join(text.split()).replace("|", "\\|").replace("`", "'") + "`"


def main() -> int:
    """Run the sample; print the table; 1 if a mutant survived."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/claims-sample"))  # noqa: S108
    parser.add_argument("--extra", action="store_true", help="run the extra rows too")
    args = parser.parse_args()
    rows = SAMPLE + (EXTRA if args.extra else [])
    _copy(args.scratch)
    check = subprocess.run(
        [sys.executable, "-c", "import keyring_hardened; print(keyring_hardened.__file__)"],
        cwd=args.scratch, env={**os.environ, "PYTHONPATH": str(args.scratch)},
        capture_output=True, text=True, check=True)
    if not check.stdout.startswith(str(args.scratch)):
        sys.exit(f"the scratch copy is not what gets imported: {check.stdout.strip()}")
    baseline = _pytest(args.scratch, *(m.test for m in rows))
    if baseline.returncode != 0:
        sys.stdout.write(baseline.stdout)
        sys.exit("the sampled tests do not pass unmutated")
    results = [_run(args.scratch, m) for m in rows]
    out = sys.stdout
    out.write("| # | claim | test | mutation (file:line, before -> after) | failure |\n")
    out.write("|---|---|---|---|---|\n")
    for n, r in enumerate(results, start=1):
        m = r.mutation
        failure = _cell(r.failure) if r.failed else "**survived**"
        out.write(f"| {n} | {m.claim} | `{m.test}` | `{m.path}:{r.line}` {_cell(m.before)} -> "
                  f"{_cell(m.after)} | {failure} |\n")
    survivors = [r for r in results if not r.failed]
    out.write(f"\n{len(results) - len(survivors)} of {len(results)} mutants killed.\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
