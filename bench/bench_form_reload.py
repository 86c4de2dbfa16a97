"""How often a reload of the human-validation form (opened from disk, headless Chromium) comes back
without the rater's progress.

    .venv/bin/python bench/bench_form_reload.py                       # 150 reloads of a fixture form
    .venv/bin/python bench/bench_form_reload.py --form OLD.html --reloads 600   # any form.html

The fixture form is the one tests/test_human_form.py builds. One rater answers the first cell,
then the page is reloaded again and again; a reload counts as lost when the form does not reopen
on that rater, and as empty when its localStorage reads empty. Needs chromium and chromedriver.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]


def fixture_form(folder: Path) -> Path:
    import test_human_form
    from test_eval import make_fixture_run
    config, run_dir = make_fixture_run(folder, eval__judge__backend="none", eval__bertscore=False)
    test_human_form.ev6.main(["--config", str(config)])
    return run_dir / "human_eval" / "form.html"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--form", type=Path, help="a form.html (default: build the fixture form)")
    parser.add_argument("--reloads", type=int, default=150)
    args = parser.parse_args()
    from test_human_form import browser, open_as, press
    with tempfile.TemporaryDirectory() as folder:
        form = args.form or fixture_form(Path(folder))
        driver = browser(Path(folder))
        try:
            open_as(driver, form, "ana")
            press(driver, "1", "4", "3", "2")
            lost = empty = 0
            for _ in range(args.reloads):
                driver.refresh()
                rater, stored = driver.execute_script("return [state && state.rater, localStorage.length]")
                lost += rater != "ana"
                empty += stored == 0
        finally:
            driver.quit()
    print(f"{form.name}: {args.reloads} reloads, {lost} lost the rater's progress, "
          f"{empty} read an empty localStorage")


if __name__ == "__main__":
    main()
