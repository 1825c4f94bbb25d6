"""Recipe stages, one module each; every module here is imported by the recipe runner and
registers its stage with ``@STAGES.register(name)``."""
