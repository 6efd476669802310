"""``starquant serve`` outside the serving environment (this one has no vLLM): one line that
names the extra to install. The server itself is tested in tests/serving/test_server.py."""

from tests.cli.run_cli import assert_user_error, starquant


def test_serve_without_vllm_names_the_serve_extra(tmp_path):
    result = starquant("serve", "tiny-llada", cwd=tmp_path, timeout=300)
    assert_user_error(result, "starquant serve needs vLLM", "starquant-plugin[serve]")
