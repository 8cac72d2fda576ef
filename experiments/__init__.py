"""Experiments around gpart_ds, kept apart from the library that users import:

    assets.py, tasks.py, convert.py   recipes that build the bundled model and data
                                      (`prepare:` in a run config; `python -m experiments.assets`)
    bench/                            speed and memory benchmarks (`python -m experiments.bench`)
    study.py                          the quality study (`python -m experiments.study`)

They use gpart_ds's public pieces (config, trainer through the launcher, methods); the
library never imports them.
"""
