"""Model families, scvi-tools style: a pure-torch module and an AnnData-facing model class."""
