"""The mdoc (BSD) macros of man pages; the groff around them is roff.py's."""

from copal.corpora.roff import Page

# Structural macros print nothing but may break; enclosures bracket the rest
# of the line; other callable macros print their arguments.
_STRUCTURE = {"Dd", "Os", "Bk", "Ek", "Rs", "Re", "Sm", "Bf", "Ef", "Tg", "Rv", "Ex"}
_ENCLOSE = {"Op": ("[", "]"), "Bq": ("[", "]"), "Pq": ("(", ")"), "Brq": ("{", "}"), "Aq": ("⟨", "⟩"),
            "Dq": ("“", "”"), "Qq": ('"', '"'), "Sq": ("‘", "’"), "Ql": ("‘", "’")}
_OPEN_CLOSE = {"Oo": "[", "Oc": "]", "Po": "(", "Pc": ")", "Bo": "[", "Bc": "]", "Bro": "{", "Brc": "}",
               "Do": "“", "Dc": "”", "Qo": '"', "Qc": '"', "So": "‘", "Sc": "’", "Ao": "⟨", "Ac": "⟩"}
_CALLABLE = {"Ad", "An", "Ap", "Ar", "At", "Bsx", "Bx", "Cd", "Cm", "Dv", "Dx", "Em", "Er", "Es", "Ev",
             "Fa", "Fd", "Fn", "Fo", "Fc", "Fr", "Ft", "Fx", "Hf", "Ic", "In", "Li", "Lk", "Me", "Mt",
             "Nm", "No", "Nx", "Ox", "Pa", "Pf", "Sx", "Sy", "Tn", "Ux", "Va", "Vt", "Xr", "Ns", "Fl",
             "Lb", "St", "Ms", "Ot", "Xc", "Xo", "Eo", "Ec", "%A", "%B", "%D", "%J", "%N", "%O", "%P",
             "%Q", "%R", "%T", "%U", "%V", *_ENCLOSE, *_OPEN_CLOSE}
_PUNCTUATION = {".", ",", ";", ":", "?", "!", ")", "]"}


def _inline(page: Page, tokens: list[str]) -> str:
    """An mdoc macro line's words: macro names vanish, 'Fl x' prints '-x',
    'Xr ls 1' prints 'ls(1)', enclosures bracket the rest of the line."""
    words: list[str] = []
    closers: list[str] = []
    glue = False  # attach the next word to the previous one

    def emit(word: str) -> None:
        nonlocal glue
        if glue and words:
            words[-1] += word
        else:
            words.append(word)
        glue = False

    xref = 0  # plain words left of an "Xr name section"; the section is parenthesised
    for position, token in enumerate(tokens):
        following = tokens[position + 1] if position + 1 < len(tokens) else None
        if token in _ENCLOSE:
            opener, closer = _ENCLOSE[token]
            emit(opener)
            glue = True
            closers.append(closer)
        elif token in _OPEN_CLOSE:  # Oo ... Oc and friends: explicit open and close
            glue = glue or token.endswith("c")
            emit(_OPEN_CLOSE[token])
            glue = token.endswith("o")
        elif token == "Fl":
            emit("-")
            glue = True
        elif token in ("Ns", "Pf"):
            glue = True
        elif token == "Xr":
            xref = 2
        elif token == "Nm" and (following is None or following in _CALLABLE
                                or following in _PUNCTUATION):
            emit(page.name)  # a bare .Nm repeats the page's name
        elif token not in _CALLABLE:
            if xref == 1:
                glue = True
                token = f"({token})"
            elif token in _PUNCTUATION:
                glue = True
            xref = max(xref - 1, 0)
            emit(token)
    for closer in reversed(closers):
        glue = True
        emit(closer)
    return " ".join(words)


def _macro(page: Page, name: str, args: list[str]) -> None:
    if name == "Nm":
        page.name = page.name or (args[0] if args else "")
        if page.section == "SYNOPSIS":
            page.flush()  # each synopsis line starts with the command's name
    if name in ("Sh", "Ss"):
        page.heading(_inline(page, args))
    elif name in ("Pp", "Lp"):
        page.blank()
    elif name == "Dt":
        page.line(" ".join(args))
    elif name == "Nd":
        page.text("- " + _inline(page, args))
    elif name in ("Bd", "Ed"):  # a display, literal or filled
        page.flush()
        page.fill = name == "Ed" or not {"-literal", "-unfilled"} & set(args)
    elif name in ("Bl", "El"):
        page.flush()
    elif name in ("It", "D1", "Dl"):  # a list item's tag, or a one-line display
        page.flush()
        page.words(_inline(page, args))
        page.flush()
    elif name not in _STRUCTURE:
        page.words(_inline(page, [name, *args]))


MACROS = dict.fromkeys(
    (*_STRUCTURE, *_CALLABLE, "Sh", "Ss", "Pp", "Lp", "Dt", "Nd", "Bd", "Ed", "Bl", "El", "It",
     "D1", "Dl"), _macro)
