"""Entry points for people: the `tlpipe` command (`cli`) and the project scaffold (`scaffold`,
`python -m tlpipe.tools.scaffold DIR`). The top floor: may import the core and any wing, and no
module imports it.
"""
