"""reproduce: table-by-table reproduction of RIFormer, RePaFormer and SiT."""
