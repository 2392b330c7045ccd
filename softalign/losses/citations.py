"""BibTeX entries of the papers behind the losses; each loss exposes the ones it implements as ``citation``
(the sentence-transformers convention, used e.g. in generated model cards)."""

from __future__ import annotations

CUSA = """@inproceedings{huang2024cusa,
  title     = {Cross-modal and Uni-modal Soft-label Alignment for Image-Text Retrieval},
  author    = {Huang, Hailang and Nie, Zhijie and Wang, Ziqiao and Shang, Ziyu},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  volume    = {38},
  year      = {2024}
}"""

TGDT = """@article{liu2023tgdt,
  title   = {Efficient Token-Guided Image-Text Retrieval with Consistent Multimodal Contrastive Training},
  author  = {Liu, Chong and Zhang, Yuqi and Wang, Hongsong and Chen, Weihua and Wang, Fan and Huang, Yan and
             Shen, Yi-Dong and Wang, Liang},
  journal = {IEEE Transactions on Image Processing},
  volume  = {32},
  pages   = {3622--3633},
  year    = {2023}
}"""

VSEPP = """@inproceedings{faghri2018vsepp,
  title     = {{VSE++}: Improving Visual-Semantic Embeddings with Hard Negatives},
  author    = {Faghri, Fartash and Fleet, David J. and Kiros, Jamie Ryan and Fidler, Sanja},
  booktitle = {Proceedings of the British Machine Vision Conference (BMVC)},
  year      = {2018}
}"""

INFONCE = """@article{oord2018cpc,
  title   = {Representation Learning with Contrastive Predictive Coding},
  author  = {van den Oord, Aaron and Li, Yazhe and Vinyals, Oriol},
  journal = {arXiv preprint arXiv:1807.03748},
  year    = {2018}
}

@inproceedings{radford2021clip,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and
               Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and
               Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning (ICML)},
  pages     = {8748--8763},
  year      = {2021}
}"""


def join(*entries: str) -> str:
    """Several BibTeX entries as one string (blank line between them)."""
    return "\n\n".join(entries)
