"""Gene panels of :func:`st2he.datasets.synthetic_tissue`: the same biological programs under other genes' names.

The simulation draws every molecule from a program (a cell type's or cell state's marker genes, housekeeping
genes); a panel only names the genes. ``"default"`` is the simulation's own panel (:data:`st2he.datasets._synthetic.
PROGRAMS` and its neighbours). The other panels give every gene of the default panel a counterpart on a real
commercial panel that marks the same program (a marker of the same lineage where the panel has one), so that a
sample drawn with the same seed has the same cells, molecules and images on every panel and only the gene names
differ: a model trained on one panel can be scored on another (``benchmarks/bench_cross_panel.py``).

Where the names come from
-------------------------
- ``"xenium_breast"``: the 313 genes of 10x Genomics' Xenium FFPE Human Breast Cancer data set (the Xenium Human
  Breast Gene Expression Panel with its 33-gene add-on; Janesick et al., Nat. Commun. 2023), whose gene list
  starts ``ABCC11, ACTA2, ACTG2, ADAM9`` and ends ``ZEB2, ZNF562``. The symbols below were written from that list
  as recalled and checked against the excerpts of it found in public code; 10x's panel file itself could not be
  read here (no network access).
- ``"xenium_lung"``: canonical lung lineage markers of 10x Genomics' Xenium Human Lung Gene Expression Panel
  (PN 1000601, 289 genes, designed on the Human Lung Cell Atlas), as recalled; 10x's panel file could not be read
  here either, so a symbol may be missing from the vendor's list. The commercial panels have no classic
  housekeeping genes: other genes of the panel that mark no lineage of st2he's marker table stand in for them.

Both Xenium panels keep Xenium's control probe names (``BLANK_*``, ``NegControlProbe_*``, ``NegControlCodeword_*``).
"""

from __future__ import annotations

#: Program names in the order the default panel lists its genes (cell types, cell states, housekeeping).
PROGRAM_ORDER = (
    "tumour_gland",
    "tumour_solid",
    "fibroblast",
    "lymphocyte",
    "macrophage",
    "endothelial",
    "erythrocyte",
    "mucinous",
    "keratinizing",
    "proliferating",
    "housekeeping",
)

# Each panel lists, for every program, the counterparts of the default panel's genes in the same order (the k-th
# gene takes the expression of the default panel's k-th gene of that program). The lineage each default gene marks
# in st2he's marker table (st2he/pp/data/lineage_markers.csv) is given in the comments (e: epithelial,
# g: glandular epithelial, s: squamous epithelial, t: T/NK, b: B cell, i: immune, m: myeloid, f: fibroblast,
# n: endothelial, r: erythroid, p: proliferating; -: not in the table); the counterpart is a marker of the same
# lineage where the panel has one.

_XENIUM_LUNG: dict[str, tuple[str, ...]] = {
    # default: EPCAM e, KRT8 e, KRT18 e, KRT7 e, NKX2-1 g, NAPSA g, SFTPB g, MUC1 g, CEACAM6 g, CLDN4 e, LPCAT1 g,
    # SFTA2 g (adenocarcinoma, AT2-like)
    "tumour_gland": (
        "EPCAM",
        "KRT8",
        "KRT18",
        "KRT7",
        "NKX2-1",
        "NAPSA",
        "SFTPB",
        "SFTPC",
        "CEACAM5",
        "CLDN4",
        "LAMP3",
        "SFTPA1",
    ),
    # default: KRT5, KRT6A, KRT14, KRT17, TP63, SOX2, DSG3, S100A2, PKP1, CLCA2, DSC3, KRT15 (all s; basal/squamous)
    "tumour_solid": (
        "KRT5",
        "KRT6A",
        "KRT13",
        "KRT17",
        "TP63",
        "SOX2",
        "DSG3",
        "S100A2",
        "PKP1",
        "KRT4",
        "DSC3",
        "KRT15",
    ),
    # default: COL1A1, COL1A2, COL3A1, DCN, LUM, PDGFRA, FAP, POSTN, SFRP2, FBLN1 (all f)
    "fibroblast": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "FAP", "THY1", "SFRP2", "CTHRC1"),
    # default: PTPRC i, CD3E t, CD3D t, CD2 t, CD8A t, MS4A1 b, CD79A b, CCL5 t, IL7R t, CD52 i
    "lymphocyte": ("PTPRC", "CD3E", "CD3D", "CD2", "CD8A", "MS4A1", "CD79A", "CCL5", "IL7R", "CD52"),
    # default: CD68, CD163, LYZ, C1QA, C1QB, APOE, MARCO, CD14, FCGR3A (all m; alveolar and interstitial macrophages)
    "macrophage": ("CD68", "CD163", "LYZ", "C1QA", "C1QB", "APOE", "MARCO", "CD14", "FCGR3A"),
    # default: PECAM1, VWF, CDH5, CLDN5, PLVAP, EMCN, KDR, RAMP2 (all n; CA4: capillary, CCL21: lymphatic)
    "endothelial": ("PECAM1", "VWF", "CDH5", "CLDN5", "PLVAP", "EMCN", "CA4", "CCL21"),
    # default: HBB, HBA1, HBA2 (all r)
    "erythrocyte": ("HBB", "HBA1", "HBA2"),
    # default: MUC5AC, TFF1, AGR2, SPDEF, MUC5B (all g; goblet and club/secretory cells)
    "mucinous": ("MUC5AC", "SCGB3A2", "BPIFB1", "SCGB1A1", "MUC5B"),
    # default: SPRR1A, SPRR1B, SPRR3, IVL, KRT10, KRT1 (all s)
    "keratinizing": ("SPRR1A", "SPRR1B", "SPRR3", "IVL", "SPRR2A", "KRT1"),
    # default: MKI67, TOP2A, CENPF (all p)
    "proliferating": ("MKI67", "TOP2A", "TYMS"),
    # default: ACTB, GAPDH, EEF1A1, RPLP0, B2M, TPT1, MALAT1, NEAT1, UBC, PGK1 (all -; MALAT1 and NEAT1 nuclear);
    # here other genes of the panel outside the marker table (all -)
    "housekeeping": ("AGER", "EMP2", "HOPX", "CAV1", "SCGB3A1", "TIMP3", "AKAP13", "ETV5", "GPRC5A", "SPARC"),
}

_XENIUM_BREAST: dict[str, tuple[str, ...]] = {
    # luminal (ER+) carcinoma: CDH1 e, ELF3 e, EPCAM e, TACSTD2 -, ESR1 g, GATA3 g, FOXA1 g, PGR g, CEACAM6 g,
    # S100A14 -, ANKRD30A -, SCGB2A1 -
    "tumour_gland": (
        "CDH1",
        "ELF3",
        "EPCAM",
        "TACSTD2",
        "ESR1",
        "GATA3",
        "FOXA1",
        "PGR",
        "CEACAM6",
        "S100A14",
        "ANKRD30A",
        "SCGB2A1",
    ),
    # basal-like / myoepithelial: KRT14 s, KRT6B s, KRT5 s, KRT16 -, LYPD3 -, DSC2 -, DSP -, JUP -, SFRP1 -,
    # CLCA2 s, TFAP2A -, KRT15 s
    "tumour_solid": (
        "KRT14",
        "KRT6B",
        "KRT5",
        "KRT16",
        "LYPD3",
        "DSC2",
        "DSP",
        "JUP",
        "SFRP1",
        "CLCA2",
        "TFAP2A",
        "KRT15",
    ),
    # MMP2 f, SFRP4 f, DPT -, MEDAG -, LRRC15 -, CCDC80 -, PCOLCE -, POSTN f, CRISPLD2 -, FBLN1 f
    "fibroblast": ("MMP2", "SFRP4", "DPT", "MEDAG", "LRRC15", "CCDC80", "PCOLCE", "POSTN", "CRISPLD2", "FBLN1"),
    # PTPRC i, CD3G t, TRAC t, CD247 t, CD8B t, BANK1 b, CD79B b, GZMA t, CCR7 t, RHOH -
    "lymphocyte": ("PTPRC", "CD3G", "TRAC", "CD247", "CD8B", "BANK1", "CD79B", "GZMA", "CCR7", "RHOH"),
    # AIF1, ITGAX, MRC1, CD86, TYROBP, FCER1G, C1QC, ITGAM, CX3CR1 (all m)
    "macrophage": ("AIF1", "ITGAX", "MRC1", "CD86", "TYROBP", "FCER1G", "C1QC", "ITGAM", "CX3CR1"),
    # KDR n, RAMP2 n, AQP1 n, EGFL7 -, CLEC14A -, MMRN2 -, SOX18 -, NOSTRIN -
    "endothelial": ("KDR", "RAMP2", "AQP1", "EGFL7", "CLEC14A", "MMRN2", "SOX18", "NOSTRIN"),
    # AHSP -, SLC4A1 -, SLC25A37 - (the panel has no haemoglobin gene)
    "erythrocyte": ("AHSP", "SLC4A1", "SLC25A37"),
    # MUC6 -, AGR3 -, SPDEF g, PIGR -, CLIC6 -
    "mucinous": ("MUC6", "AGR3", "SPDEF", "PIGR", "CLIC6"),
    # GJB2 -, KRT23 -, DMKN -, SERPINB9 -, CDC42EP1 -, S100A4 - (no keratinisation gene on the panel)
    "keratinizing": ("GJB2", "KRT23", "DMKN", "SERPINB9", "CDC42EP1", "S100A4"),
    # PCLAF -, CENPF p, TOP2A p
    "proliferating": ("PCLAF", "CENPF", "TOP2A"),
    # genes outside the marker table, most of them broadly expressed: TOMM7, TMEM147, NPM3, POLR2J3, SMS,
    # TRAPPC3, PTRHD1, EIF4EBP1, LDHB, SEC11C (all -)
    "housekeeping": (
        "TOMM7",
        "TMEM147",
        "NPM3",
        "POLR2J3",
        "SMS",
        "TRAPPC3",
        "PTRHD1",
        "EIF4EBP1",
        "LDHB",
        "SEC11C",
    ),
}

#: Genes of the commercial panels (the symbols st2he uses and others of the same panel, as recalled; see the
#: module docstring): every gene a panel maps to is one of these.
PANEL_GENES: dict[str, frozenset[str]] = {
    "xenium_breast": frozenset(
        """
        ABCC11 ACTA2 ACTG2 ADAM9 ADGRE5 ADH1B ADIPOQ AGR3 AHSP AIF1 AKR1C1 AKR1C3 ALDH1A3 ANGPT2 ANKRD28 ANKRD29
        ANKRD30A APOBEC3A APOBEC3B APOC1 AQP1 AQP3 AR AVPR1A BACE2 BANK1 BASP1 BTNL9 C15orf48 C1QA C1QC C2orf42
        C5orf46 C6orf132 CAV1 CAVIN2 CCDC6 CCDC80 CCL20 CCL5 CCL8 CCND1 CCPG1 CCR7 CD14 CD163 CD19 CD1C CD247 CD27
        CD274 CD3D CD3E CD3G CD4 CD68 CD69 CD79A CD79B CD80 CD83 CD86 CD8A CD8B CD9 CD93 CDC42EP1 CDH1 CEACAM6
        CEACAM8 CENPF CLCA2 CLDN4 CLDN5 CLEC14A CLEC9A CLECL1 CLIC6 CPA3 CRHBP CRISPLD2 CSF3 CTH CTLA4 CTSG CTTN
        CX3CR1 CXCL12 CXCL16 CXCL5 CXCR4 CYP1A1 CYTIP DAPK3 DERL3 DMKN DNAAF1 DNTTIP1 DPT DSC2 DSP DST DUSP2 DUSP5
        EDN1 EDNRB EGFL7 EGFR EIF4EBP1 ELF3 ELF5 ENAH EPCAM ERBB2 ERN1 ESM1 ESR1 FAM107B FAM49A FASN FBLIM1 FBLN1
        FCER1A FCER1G FCGR3A FGL2 FLNB FOXA1 FOXC2 FOXP3 FSTL3 GATA3 GJB2 GLIPR1 GNLY GPR183 GZMA GZMB GZMK HAVCR2
        HDC HMGA1 HOOK2 HOXD8 HOXD9 HPX IGF1 IL2RA IL2RG IL3RA IL7R ITGAM ITGAX ITM2C JUP KARS KDR KIT KLF5 KLRB1
        KLRC1 KLRD1 KLRF1 KRT14 KRT15 KRT16 KRT23 KRT5 KRT6B KRT7 KRT8 LAG3 LARS LDHB LEP LGALSL LIF LILRA4 LPL
        LPXN LRRC15 LTB LUM LY86 LYPD3 LYZ MAP3K8 MDM2 MEDAG MKI67 MLPH MMP1 MMP12 MMP2 MMRN2 MNDA MPO MRC1 MS4A1
        MUC6 MYBPC1 MYH11 MYLK MYO5B MZB1 NARS NCAM1 NDUFA4L2 NKG7 NOSTRIN NPM3 OCIAD2 OPRPN OXTR PCLAF PCOLCE
        PDCD1 PDCD1LG2 PDE4A PDGFRA PDGFRB PDK4 PECAM1 PELI1 PGR PIGR PIM1 PLD4 POLR2J3 POSTN PPARG PRDM1 PRF1
        PTGDS PTN PTPRC PTRHD1 QARS RAB30 RAMP2 RAPGEF3 REXO4 RHOH RORC RTKN2 RUNX1 S100A14 S100A4 S100A8 SCD
        SCGB2A1 SDC4 SEC11C SEC24A SELL SERHL2 SERPINA3 SERPINB9 SFRP1 SFRP4 SH3YL1 SLAMF1 SLAMF7 SLC25A37 SLC4A1
        SLC5A6 SMAP2 SMS SNAI1 SOX17 SOX18 SPDEF SQLE SRPK1 SSTR2 STC1 SVIL TAC1 TACSTD2 TCEAL7 TCF15 TCF4 TCF7 TCIM
        TCL1A TENT5C TFAP2A THAP2 TIFA TIGIT TIMP4 TMEM147 TNFRSF17 TOMM7 TOP2A TPD52 TPSAB1 TRAC TRAF4 TRAPPC3
        TRIB1 TUBA4A TUBB2B TYROBP UCP1 USP53 VOPP1 VWF WARS ZEB1 ZEB2 ZNF562
        """.split()
    ),
    "xenium_lung": frozenset(
        """
        ACTA2 AGER AKAP13 APOE AQP1 ASCL1 BPIFA1 BPIFB1 C1QA C1QB CA4 CALCA CAV1 CCL21 CCL5 CD14 CD163 CD19 CD1A
        CD2 CD3D CD3E CD4 CD52 CD68 CD79A CD8A CDH5 CEACAM5 CEACAM6 CFTR CLDN4 CLDN5 COL1A1 COL1A2 COL3A1 CTHRC1
        DCN DSC3 DSG3 EMCN EMP2 EPCAM ETV5 FAP FCGR3A FOXJ1 GPRC5A HBA1 HBA2 HBB HHIP HOPX IL7R IVL KRT1 KRT13 KRT15
        KRT17 KRT18 KRT4 KRT5 KRT6A KRT7 KRT8 LAMP3 LUM LYZ MARCO MKI67 MS4A1 MSLN MUC5AC MUC5B MYH11 NAPSA NKX2-1
        PDGFRA PDGFRB PECAM1 PKP1 PLVAP PTPRC S100A2 SCGB1A1 SCGB3A1 SCGB3A2 SFRP2 SFTPA1 SFTPB SFTPC SOX2 SPARC
        SPRR1A SPRR1B SPRR2A SPRR3 THY1 TIMP3 TOP2A TP63 TPSAB1 TYMS VWF
        """.split()
    ),
}

PANELS: dict[str, dict[str, tuple[str, ...]]] = {"xenium_lung": _XENIUM_LUNG, "xenium_breast": _XENIUM_BREAST}
#: Panel names ``synthetic_tissue(panel=...)`` takes.
PANEL_NAMES = ("default", *PANELS)


def _default_programs() -> dict[str, tuple[str, ...]]:
    from ._synthetic import HOUSEKEEPING, PROGRAMS, STATE_PROGRAMS

    return {**PROGRAMS, **STATE_PROGRAMS, "housekeeping": HOUSEKEEPING}


def panel_programs(panel: str = "default") -> dict[str, tuple[str, ...]]:
    """``{program: genes}`` of ``panel`` (cell types, cell states and ``"housekeeping"``, in :data:`PROGRAM_ORDER`)."""
    check_panel(panel)
    programs = _default_programs() if panel == "default" else PANELS[panel]
    return {name: tuple(programs[name]) for name in PROGRAM_ORDER}


def check_panel(panel) -> str:
    """Raise a clear error for an unknown panel name; return the name."""
    if not isinstance(panel, str) or panel not in PANEL_NAMES:
        msg = f"panel must be one of {PANEL_NAMES}, got {panel!r}."
        raise ValueError(msg)
    return panel


def gene_map(panel: str) -> dict[str, str]:
    """``{default gene: gene of panel}``: the gene of ``panel`` that takes each default gene's expression."""
    check_panel(panel)
    default = _default_programs()
    other = panel_programs(panel)
    out: dict[str, str] = {}
    for name in PROGRAM_ORDER:
        for g, h in zip(default[name], other[name], strict=True):
            out[g] = h
    return out


def panel_names(panel: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(genes, controls)`` of ``panel`` in the order of the default panel's ``GENES`` and ``CONTROLS``."""
    from ._synthetic import CONTROLS, GENES

    if check_panel(panel) == "default":
        return GENES, CONTROLS
    mapping = gene_map(panel)
    genes = tuple(mapping[g] for g in GENES)
    if len(set(genes)) != len(genes):  # pragma: no cover - guarded by the tests
        msg = f"Panel {panel!r} names a gene twice."
        raise RuntimeError(msg)
    return genes, CONTROLS
