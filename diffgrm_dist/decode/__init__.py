"""Generation: the catalogue index a beam search prunes with (``catalogue``) and the searches
themselves (``search``: CPD, AR beam search, dense top-k)."""
