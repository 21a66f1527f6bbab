"""The README's test command is what CI runs."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme_path = os.path.join(ROOT, "README.md")
    ci_path = os.path.join(ROOT, ".ci", "run")
    if not (os.path.exists(readme_path) and os.path.exists(ci_path)):
        import pytest
        pytest.skip("not run from a source checkout")
    readme = open(readme_path).read()
    command = readme.split("Run the tests:")[1].split("```bash\n")[1].split("\n```")[0]
    assert command.strip() and "\n" not in command.strip()
    assert any(line.startswith(command.strip()) for line in open(ci_path).read().splitlines())
