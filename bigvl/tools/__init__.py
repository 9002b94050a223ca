"""Tools: programs that use a task's model and weights without training it, run by
``python -m bigvl.main --config ... --workdir W`` when the config sets ``config.tool = '<name>'``
(``bigvl/tools/<name>.py`` defines ``Tool(config_reader, task, mesh)`` with ``run(run,
workdir)``). The model's weights come from ``config.init_from``, read into their shards by the
train loop's own init (``_common.load_params``); nothing is optimised and no optimizer state
is allocated."""
