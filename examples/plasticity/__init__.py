"""Loss-of-plasticity experiments with hessrank (see examples/README.md)."""
