"""`stethoscope tokens` and `stethoscope serve` as a user types them: results on stdout,
one-line errors with exit 2, the token shown once; and `stethoscope demo` leaving its model
where `serve --models` finds it."""
# ruff: noqa: F811 - the shared fixtures are imported by name, then used as arguments

from __future__ import annotations

import pytest
from test_service_support import service_clips, service_models  # noqa: F401 - fixtures

from stethoscope.cli import main
from stethoscope.service.auth import TokenAuthority
from stethoscope.service.store import Store


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tokens_create_list_revoke(tmp_path, capsys):
    db = ["--db", f"sqlite:///{tmp_path / 'store.db'}"]
    code, out, err = run(capsys, "tokens", "create", "--scope", "read,score", "--name",
                         "line 3 mic", *db)
    assert code == 0
    token = out.strip()
    assert token.startswith("stk_") and len(out.splitlines()) == 1  # stdout: the token alone
    assert "shown only now" in err and token not in err
    token_id = token.split("_")[1]
    info = TokenAuthority(Store(db[1])).verify(token)
    assert info is not None and info.scopes == {"read", "score"} and info.name == "line 3 mic"

    code, out, _ = run(capsys, "tokens", "list", *db)
    assert code == 0 and token_id in out and "read score" in out and "active" in out
    assert token.split("_", 2)[2] not in out  # never the secret

    assert run(capsys, "tokens", "revoke", token_id, *db)[0] == 0
    assert TokenAuthority(Store(db[1])).verify(token) is None
    code, _, err = run(capsys, "tokens", "revoke", token_id, *db)
    assert code == 2 and err.count("\n") == 1 and "no active token" in err


def test_tokens_errors_are_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "tokens", "create", "--scope", "root",
                         "--db", f"sqlite:///{tmp_path / 'store.db'}")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "unknown scope 'root'" in err and "score, read, admin" in err
    code, _, err = run(capsys, "tokens", "list", "--db", "nonsense://")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_serve_refuses_an_open_server_and_bad_models(tmp_path, capsys, service_models):
    code, out, err = run(capsys, "serve", "--models", str(service_models), "--host", "0.0.0.0",
                         "--data", str(tmp_path / "data"))
    assert code == 2 and out == "" and "refusing to listen on 0.0.0.0" in err
    assert err.count("\n") == 1
    code, _, err = run(capsys, "serve", "--models", str(tmp_path / "nothing"),
                       "--data", str(tmp_path / "data"))
    assert code == 2 and "no such models folder" in err
    code, _, err = run(capsys, "serve", "--models", str(service_models), "--keep-audio", "999",
                       "--data", str(tmp_path / "data"))
    assert code == 2 and "--keep-audio must be between 0 and 365" in err


def test_demo_leaves_its_model_where_serve_reads_models(tmp_path):
    from stethoscope.demo import run_demo
    from stethoscope.service.machines import load_fleet

    run_demo(tmp_path / "demo", machine="valve", n_train=12, n_test_normal=6, n_abnormal=6)
    fleet = load_fleet(tmp_path / "demo" / "models", warm_up=False)
    assert list(fleet) == ["valve"]
    assert (tmp_path / "demo" / "model" / "config.json").is_file()  # the old place stays


@pytest.mark.parametrize("argv", [["serve", "--help"], ["tokens", "create", "--help"]])
def test_service_commands_are_in_the_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "--db" in capsys.readouterr().out
