"""Classic GCN socket packets (160 bytes, 40 big-endian int32) → Alert.

Layout shared by the burst notices (GCN socket packet definition doc, and
nasa-gcn/gcn-classic-to-json): word 0 packet type, 1 serial number, 4
trigger/observation number, 5 burst TJD (JD − 2440000.5), 6 burst SOD in
centiseconds (UTC), 7/8 RA/Dec in 1e-4 deg (J2000), 11 error radius in
1e-4 deg. Exceptions are in :data:`TYPES` (error word/scale) and below
(GECAM writes the SOD in 1e-4 s, GRB_CNTRPART takes its time from words
14/15, LVC adds a fraction of a second in word 13). Types that carry no
event (pointing directions, light curves, images, spectra) give no Alert;
unknown types raise ParseError.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from tomd.alerts.model import Alert, Localization
from tomd.errors import ParseError

from ._common import check_radec

TJD_EPOCH = datetime(1968, 5, 24, tzinfo=timezone.utc)  # TJD 0 = JD 2440000.5
POS_SCALE = 1e-4  # RA/Dec words: units of 0.0001 deg


@dataclass(frozen=True, slots=True)
class PacketType:
    name: str
    mission: str
    mode: str  # "pos": position notice; "event": event without position; "ignore"
    err_word: int | None = 11
    err_scale: float = 1e-4  # degrees per unit of the error word
    test: bool = False


def _t(name: str, mission: str, mode: str = "pos", err_word: int | None = 11,
       err_scale: float = 1e-4, test: bool = False) -> PacketType:
    return PacketType(name, mission, mode, err_word, err_scale, test)


TYPES: dict[int, PacketType] = {
    2: _t("TEST_COORDS", "GCN", test=True),
    3: _t("IM_ALIVE", "GCN", "ignore"),
    31: _t("IPN_RAW", "IPN", "event"),
    44: _t("HETE_TEST", "HETE", "event", test=True),
    45: _t("GRB_CNTRPART", "GCN"),
    46: _t("SWIFT_TOO_FOM", "Swift", "ignore"),
    47: _t("SWIFT_TOO_SC_SLEW", "Swift", "ignore"),
    51: _t("INTEGRAL_POINTDIR", "INTEGRAL", "ignore"),
    52: _t("INTEGRAL_SPIACS", "INTEGRAL", "event"),
    53: _t("INTEGRAL_WAKEUP", "INTEGRAL", err_scale=1 / 3600),
    54: _t("INTEGRAL_REFINED", "INTEGRAL", err_scale=1 / 3600),
    55: _t("INTEGRAL_OFFLINE", "INTEGRAL", err_scale=1 / 3600),
    56: _t("INTEGRAL_WEAK", "INTEGRAL", err_scale=1 / 3600),
    59: _t("KONUS_LC", "Konus-Wind", "event"),
    60: _t("SWIFT_BAT_GRB_ALERT", "Swift", "event"),
    61: _t("SWIFT_BAT_GRB_POS_ACK", "Swift"),
    62: _t("SWIFT_BAT_GRB_POS_NACK", "Swift", "event"),
    63: _t("SWIFT_BAT_GRB_LC", "Swift", "ignore"),
    64: _t("SWIFT_BAT_SCALEDMAP", "Swift", "ignore"),
    65: _t("SWIFT_FOM_OBS", "Swift", "ignore"),
    66: _t("SWIFT_SC_SLEW", "Swift", "ignore"),
    67: _t("SWIFT_XRT_POSITION", "Swift"),
    68: _t("SWIFT_XRT_SPECTRUM", "Swift", "ignore"),
    69: _t("SWIFT_XRT_IMAGE", "Swift", "ignore"),
    70: _t("SWIFT_XRT_LC", "Swift", "ignore"),
    71: _t("SWIFT_XRT_CENTROID", "Swift", err_word=None),
    72: _t("SWIFT_UVOT_DBURST", "Swift", "ignore"),
    73: _t("SWIFT_UVOT_FCHART", "Swift", "ignore"),
    76: _t("SWIFT_BAT_GRB_LC_PROC", "Swift", "ignore"),
    77: _t("SWIFT_XRT_SPECTRUM_PROC", "Swift", "ignore"),
    78: _t("SWIFT_XRT_IMAGE_PROC", "Swift", "ignore"),
    79: _t("SWIFT_UVOT_DBURST_PROC", "Swift", "ignore"),
    80: _t("SWIFT_UVOT_FCHART_PROC", "Swift", "ignore"),
    81: _t("SWIFT_UVOT_POS", "Swift"),
    82: _t("SWIFT_BAT_GRB_POS_TEST", "Swift", test=True),
    83: _t("SWIFT_POINTDIR", "Swift", "ignore"),
    84: _t("SWIFT_BAT_TRANS", "Swift"),
    85: _t("SWIFT_XRT_THRESHPIX", "Swift", "ignore"),
    86: _t("SWIFT_XRT_THRESHPIX_PROC", "Swift", "ignore"),
    87: _t("SWIFT_XRT_SPER", "Swift", "ignore"),
    88: _t("SWIFT_XRT_SPER_PROC", "Swift", "ignore"),
    89: _t("SWIFT_UVOT_POS_NACK", "Swift", "event"),
    97: _t("SWIFT_BAT_QL_POS", "Swift"),
    98: _t("SWIFT_BAT_SUB_THRESHOLD", "Swift"),
    99: _t("SWIFT_BAT_SLEW_POS", "Swift"),
    100: _t("AGILE_GRB_WAKEUP", "AGILE"),
    101: _t("AGILE_GRB_GROUND", "AGILE"),
    102: _t("AGILE_GRB_REFINED", "AGILE"),
    103: _t("SWIFT_ACTUAL_POINTDIR", "Swift", "ignore"),
    107: _t("AGILE_POINTDIR", "AGILE", "ignore"),
    109: _t("AGILE_GRB_POS_TEST", "AGILE", test=True),
    110: _t("FERMI_GBM_ALERT", "Fermi", "event"),
    111: _t("FERMI_GBM_FLT_POS", "Fermi"),
    112: _t("FERMI_GBM_GND_POS", "Fermi"),
    113: _t("FERMI_GBM_LC", "Fermi", "ignore"),
    114: _t("FERMI_GBM_GND_INTERNAL", "Fermi"),
    115: _t("FERMI_GBM_FIN_POS", "Fermi"),
    116: _t("FERMI_GBM_ALERT_INTERNAL", "Fermi", "event"),
    117: _t("FERMI_GBM_FLT_INTERNAL", "Fermi"),
    118: _t("FERMI_GBM_TRANS", "Fermi"),
    119: _t("FERMI_GBM_POS_TEST", "Fermi", test=True),
    120: _t("FERMI_LAT_POS_INI", "Fermi"),
    121: _t("FERMI_LAT_POS_UPD", "Fermi"),
    122: _t("FERMI_LAT_POS_DIAG", "Fermi"),
    123: _t("FERMI_LAT_TRANS", "Fermi"),
    124: _t("FERMI_LAT_POS_TEST", "Fermi", test=True),
    125: _t("FERMI_LAT_MONITOR", "Fermi"),
    126: _t("FERMI_SC_SLEW", "Fermi", "ignore"),
    127: _t("FERMI_LAT_GND", "Fermi"),
    128: _t("FERMI_LAT_OFFLINE", "Fermi"),
    129: _t("FERMI_POINTDIR", "Fermi", "ignore"),
    130: _t("SIMBAD_NED_SEARCH_RESULTS", "GCN", "ignore"),
    131: _t("FERMI_GBM_SUBTHRESH", "Fermi"),
    133: _t("SWIFT_BAT_MONITOR", "Swift"),
    134: _t("MAXI_UNKNOWN", "MAXI"),
    135: _t("MAXI_KNOWN", "MAXI"),
    136: _t("MAXI_TEST", "MAXI", test=True),
    139: _t("MOA", "MOA"),
    145: _t("COINCIDENCE", "GCN", "ignore"),
    148: _t("SUZAKU_LC", "Suzaku", "ignore"),
    149: _t("SNEWS", "SNEWS", "event"),
    150: _t("LVC_PRELIMINARY", "LVK", "event"),
    151: _t("LVC_INITIAL", "LVK", "event"),
    152: _t("LVC_UPDATE", "LVK", "event"),
    153: _t("LVC_TEST", "LVK", "event", test=True),
    154: _t("LVC_CNTRPART", "LVK"),
    157: _t("AMON_ICECUBE_COINC", "AMON"),
    158: _t("AMON_ICECUBE_HESE", "AMON"),
    159: _t("UNKNOWN", "GCN", "ignore"),
    160: _t("CALET_GBM_FLT_LC", "CALET", err_word=None),
    161: _t("CALET_GBM_GND_LC", "CALET", err_word=None),
    164: _t("LVC_RETRACTION", "LVK", "event"),
    169: _t("AMON_ICECUBE_EHE", "AMON"),
    171: _t("HAWC_BURST_MONITOR", "HAWC"),
    173: _t("ICECUBE_ASTROTRACK_GOLD", "IceCube"),
    174: _t("ICECUBE_ASTROTRACK_BRONZE", "IceCube"),
    175: _t("SK_SN", "Super-Kamiokande", err_word=15),
    176: _t("ICECUBE_CASCADE", "IceCube"),
    188: _t("GECAM_FLT", "GECAM", err_word=10),
    189: _t("GECAM_GND", "GECAM", err_word=10),
}
LVC_TYPES = frozenset({150, 151, 152, 153, 164})

# Missions number their triggers independently (a Swift and an IceCube trigger
# can share a number), so an event id is "<mission>:<trigger>". The slugs are
# gcn-schema's notice folders (swift, fermi, icecube, superk, ...) so that the
# same trigger arriving as a Kafka JSON notice, a VOEvent or a binary packet
# is one notice. LVK superevent ids are unique already and stay bare.
MISSION_SLUGS = {"Super-Kamiokande": "superk", "Konus-Wind": "konus", "LVK": "lvk"}


def mission_slug(mission: str) -> str:
    """'Swift' → 'swift', 'Einstein Probe' → 'einstein_probe', 'Super-Kamiokande' → 'superk'."""
    if mission in MISSION_SLUGS:
        return MISSION_SLUGS[mission]
    return "".join(c if c.isalnum() else "_" for c in mission.strip().lower()).strip("_") or "gcn"


def qualified_id(mission: str | None, event_id: str) -> str:
    """'1125809' of Swift → 'swift:1125809' (unchanged when already qualified or no mission)."""
    if not mission or ":" in event_id:
        return event_id
    return f"{mission_slug(mission)}:{event_id}"
LVC_PREFIXES = ("G", "T", "M", "Y", "H", "E", "K", "S", "GW", "TS", "TGW", "MS", "MGW")


def _words_text(words: tuple[int, ...]) -> str:
    """Characters packed four per word, least-significant byte first."""
    raw = b"".join((w & 0xFFFFFFFF).to_bytes(4, "little") for w in words)
    return raw.split(b"\x00", 1)[0].decode("ascii", "replace")


def _time(tjd: int, centisec: float) -> datetime:
    # TJD counts UTC days; SOD is seconds of that UTC day.
    if not 10000 < tjd < 40000 or centisec < 0:
        raise ParseError(f"packet time is not plausible: TJD {tjd}, SOD {centisec / 100:.2f} s")
    return TJD_EPOCH + timedelta(days=tjd, seconds=centisec / 100.0)


def _bit(word: int, n: int) -> bool:
    return bool((word >> n) & 1)


def parse(record: dict, *, source: str = "gcn") -> list[Alert]:
    words: tuple[int, ...] = tuple(record["words"])
    ptype = words[0]
    info = TYPES.get(ptype)
    if info is None:
        raise ParseError(f"classic GCN packet type {ptype} is not supported")
    if info.mode == "ignore":
        return []
    if ptype in (188, 189):
        time = _time(words[5], words[6] / 100.0)  # GECAM: SOD in 1e-4 s
    elif ptype == 45:
        time = _time(words[14], words[15])
    elif ptype in LVC_TYPES:
        time = _time(words[5], words[6] + words[13] * 1e-2)
    else:
        time = _time(words[5], words[6])
    trig = words[4]
    event_id = qualified_id(info.mission, str(trig))
    test = info.test
    retraction = False
    fields: dict = {"packet_type": ptype, "packet_serial": words[1], "mission": info.mission}
    if ptype in LVC_TYPES:
        misc, trig_id = words[19], words[18]
        test = test or _bit(trig_id, 1)
        retraction = ptype == 164 or _bit(trig_id, 5)
        prefix_i = (misc >> 20) & 0xF
        prefix = LVC_PREFIXES[prefix_i - 1] if 1 <= prefix_i <= len(LVC_PREFIXES) else ""
        suffix = chr((misc >> 10) & 0xFF).strip("\x00")
        event_id = f"{prefix}{trig}{suffix}"
        path = _words_text(words[29:39])
        if path:
            fields["skymap_path"] = path
        fields["record_number"] = (misc >> 24) & 0xFF
    elif ptype == 175:
        test = test or _bit(words[18], 1)

    ra = dec = err = None
    if info.mode == "pos":
        ra_w, dec_w = words[7], words[8]
        ra, dec = ra_w * POS_SCALE, dec_w * POS_SCALE
        if not (0 <= ra <= 360 and -90 <= dec <= 90):
            raise ParseError(f"packet RA/Dec out of range: {ra}, {dec} (type {info.name})")
        ra, dec = check_radec(ra, dec)
        if info.err_word is not None and words[info.err_word] > 0:
            err = words[info.err_word] * info.err_scale
    loc = Localization(ra=ra, dec=dec, error_deg=err) if ra is not None else None
    return [
        Alert(
            source=source,
            key=f"{info.name}:{trig}:{words[1]}:{words[3]}",
            time=time,
            kind="localization",
            ra=ra,
            dec=dec,
            event_id=event_id,
            notice_type=info.name,
            localization=loc,
            retraction=retraction,
            test=test,
            fields=fields,
            payload={"packet_type": ptype, "words": list(words)},
        )
    ]
