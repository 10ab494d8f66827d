"""What a person looks at: feature previews, the static HTML browser, plots.

Imports every layer below it; nothing imports it but sae's top-level modules and the scripts.
"""
