"""Composed jobs that sit above the components: `edgecut demo` and `edgecut bench`.

They start agents and tail services together, so they may import edge, cloud and partition; no
component imports them back.
"""
