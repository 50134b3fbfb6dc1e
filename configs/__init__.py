"""The recipes, one file per recipe, each a `get_config()` returning the
config (`introvae_jax.configuration.base_config` with a few fields changed).

In a clone: `python main.py --config=configs/<name>.py`. The wheel carries the
same files as `introvae_jax.configs`; `introvae_jax.recipe_path(name)` gives
an installed recipe's path (`introvae_jax/recipes.py`).
"""
