"""Labs (issue 15): a YAML file describing principals, domains and groups of nodes, brought up
with `kh up`, reconciled, checked and taken down from remembered state. See docs/labs.md."""
