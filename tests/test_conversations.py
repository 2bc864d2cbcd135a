"""Conversations in the database: full-text search kept in step with every change, rename, undoable delete, export,
and `logs -q` on the command line."""

from __future__ import annotations

import json
import sqlite3
import time

import sqlite_utils

from helpers import run_cli
from localmoe.record.recorder import MIGRATIONS, Recorder, migrate, substring_words


def exchange(rec: Recorder, question: str, answer: str, title: str | None = None, cid: int | None = None) -> int:
    cid = cid or rec.new_conversation("m", title=title or question)
    q = rec.add_message(cid, "user", question)
    a = rec.add_message(cid, "assistant", "", model="m", status="pending", reply_to=q)
    # the answer's text arrives by an update, as a streamed answer's does
    rec.finish_message(a, answer, "complete", None, {"joules": 1.25, "measured": 0})
    return cid


def test_search_follows_inserts_updates_and_deletes_and_leaves_nothing_behind(home):
    with Recorder() as rec:
        keep = exchange(rec, "Name a big city.", "Tokyo is a megalopolis.")
        gone = exchange(rec, "Which bird talks?", "The parrot, a chatterbox.")
        assert [r["conversation_id"] for r in rec.search_messages("chatter")] == [gone]
        assert [c["id"] for c in rec.conversation_list("megalo")] == [keep]
        rec.delete_conversations([gone])
        assert rec.search_messages("chatterbox") == rec.search_messages("parrot") == []
        assert [r["conversation_id"] for r in rec.search_messages("megalopolis")] == [keep]
        rec.vacuum()
    db = home / "localmoe.db"
    conn = sqlite3.connect(db)
    conn.execute("insert into messages_fts (messages_fts) values ('integrity-check')")  # raises if out of step
    # not a token of it left in the index's own tables, nor in any byte of the files
    assert conn.execute("select count(*) from messages_fts_idx where term like 'chatter%'").fetchone() == (0,)
    conn.close()
    assert b"chatterbox" not in b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("localmoe.db"))


def test_the_migration_indexes_rows_written_before_it(home):
    home.mkdir(parents=True)
    old = sqlite_utils.Database(sqlite3.connect(home / "localmoe.db", isolation_level=None))
    migrate(old, migrations=MIGRATIONS[:6])
    old.execute("insert into conversations (id, title, model, created_at) values (1, 't', 'm', 'then')")
    old.execute("insert into messages (conversation_id, role, content, created_at) values (1, 'user', 'an aardvark', "
                "'then')")
    old.conn.close()
    with Recorder() as rec:
        assert [r["content"] for r in rec.search_messages("aardvark")] == ["an aardvark"]
        assert rec.search_messages('" OR * -:') == []  # what a person types is never FTS5 syntax


def test_rename_delete_undo_and_export_round_trip(home, tmp_path):
    with Recorder() as rec:
        cid = exchange(rec, "What is 2+2?", "Four.")
        exchange(rec, "And 3+3?", "Six.", cid=cid)
        rec.rename_conversation(cid, "  sums  ")
        before = rec.conversation_messages(cid)
        snap = rec.snapshot_conversations([cid])
        rec.delete_conversations([cid])
        assert rec.conversation_list() == []
        rec.restore_conversations(snap)
        [row] = rec.conversation_list()
        assert (row["title"], row["messages"], row["joules"]) == ("sums", 4, 2.5)
        assert rec.conversation_messages(cid) == before and rec.search_messages("six")
        exported = json.loads(rec.export_conversation(cid, tmp_path, "json").read_text())
        assert exported["messages"] == before and exported["conversation"]["title"] == "sums"
        md = rec.export_conversation(cid, tmp_path, "md").read_text()
        assert md.startswith("# sums") and "## You\n\nAnd 3+3?" in md


def test_an_export_never_overwrites_another_conversations(home, tmp_path):
    """SQLite gives a new conversation the id of a deleted last one: its export must not replace the old file."""
    with Recorder() as rec:
        cid = exchange(rec, "Hello there", "Hi!")
        first = rec.export_conversation(cid, tmp_path, "md")
        again = rec.export_conversation(cid, tmp_path, "md")
        rec.delete_conversations([cid])
        time.sleep(1.1)  # a later start, to the second, as any two chats a person starts
        reused = exchange(rec, "Hello there", "Hello again.")
        assert reused == cid  # the id came back
        second = rec.export_conversation(reused, tmp_path, "md")
    assert again == first and second != first
    assert "Hi!" in first.read_text() and "Hello again." in second.read_text()


def test_logs_q_finds_an_old_answer_from_the_cli(home):
    with Recorder() as rec:
        cid = exchange(rec, "Which bird talks?", "The parrot, a chatterbox.")
        exchange(rec, "Name a city.", "Tokyo.")
    r = run_cli("logs", "-q", "chatterbox", "--json")
    assert r.returncode == 0, r.stderr
    assert [(x["conversation_id"], x["role"]) for x in json.loads(r.stdout)] == [(cid, "assistant")]
    r = run_cli("logs", "-q", "parrot")
    assert r.returncode == 0 and "[parrot]" in r.stdout and f"conversation {cid}" in r.stdout
    r = run_cli("logs", "-q", "--", "-*-")
    assert r.returncode == 2 and r.stderr.startswith("localmoe: error:") and "Traceback" not in r.stderr


def test_a_word_inside_unspaced_text_is_found(home):
    """Japanese and Chinese are written without spaces: the index held "日本の首都はどこですか" as one token, so
    searching 首都 found nothing. Such a query is matched as substrings, in `logs -q` and F2's search alike."""
    with Recorder() as rec:
        ja = exchange(rec, "日本の首都はどこですか？", "東京です。Tokyo is the capital.")
        en = exchange(rec, "What is the capital of France?", "Paris.")
        assert [(r["conversation_id"], r["snippet"]) for r in rec.search_messages("首都")] == [
            (ja, "日本の[首都]はどこですか？")]
        assert [r["snippet"] for r in rec.search_messages("東京 tokyo")] == ["[東京]です。[Tokyo] is the capital."]
        assert rec.search_messages("首都 Paris") == []  # every word must occur in the message
        assert [c["id"] for c in rec.conversation_list("首都")] == [ja]
        assert {c["id"] for c in rec.conversation_list("capital")} == {ja, en}  # spaced words: the index
    r = run_cli("logs", "-q", "首都")
    assert r.returncode == 0 and "[首都]" in r.stdout, r.stdout + r.stderr
    # Thai's vowel and tone marks belong to their word (split there, a word became letters matching anything)
    with Recorder() as rec:
        th = exchange(rec, "ที่นี่ที่ไหน", "กรุงเทพ")
        exchange(rec, "ไปไหนมา", "ตลาด")
        assert substring_words("ที่นี่") == ["ที่นี่"]
        assert [r["conversation_id"] for r in rec.search_messages("ที่นี่")] == [th]


def test_an_api_clients_history_is_context_not_the_users_chat(home):
    """A request's history is stored as context: `logs` does not list it as questions asked, and a conversation
    left with only that (the request then failed) is not taken for the user's latest chat by `ask -c`."""
    with Recorder() as rec:
        mine = exchange(rec, "What is 2+2?", "Four.")
        sent = rec.add_context("m", "What is my name?", "chat", [
            {"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "My name is Zed."},
            {"role": "assistant", "content": "Arr, Zed."}])
        rows = rec.conversation_messages(sent)
        assert [(r["role"], r["status"]) for r in rows] == [("system", "context"), ("user", "context"),
                                                           ("assistant", "context")]
        assert rows[2]["reply_to"] == rows[1]["id"]
        assert rec.latest_conversation_id() == mine
        assert [x["prompt"] for x in rec.recent_exchanges()] == ["What is 2+2?"]
        assert [r["conversation_id"] for r in rec.search_messages("Zed")] == [sent, sent]


def test_the_latest_conversation_is_the_one_written_to_last(home):
    """`ask -c` continued the conversation made last, not the older one the user had resumed and asked in since."""
    with Recorder() as rec:
        first = exchange(rec, "What is the capital of Japan?", "Tokyo.")
        newest = exchange(rec, "What is the capital of Spain?", "Madrid.")
        assert rec.latest_conversation_id() == newest
        exchange(rec, "And of China?", "Beijing.", cid=first)  # F2: resumed, then asked in
        assert rec.latest_conversation_id() == first


def test_an_answer_cut_off_says_so_when_resumed_and_exported(home, tmp_path):
    """The live stats line says "(cut off at 96 tokens)"; the resumed chat's line and the Markdown export said
    nothing of it."""
    from localmoe.ui.chat import recorded_note

    with Recorder() as rec:
        cid = rec.new_conversation("m", title="sky")
        q = rec.add_message(cid, "user", "What color is the sky?")
        a = rec.add_message(cid, "assistant", "", model="m", status="pending", reply_to=q)
        rec.finish_message(a, "In modern times, the sky has been", "complete",
                           {"completion_tokens": 96, "stop_reason": "length"})
        facts = rec.answer_facts(cid)[a]
        [answer] = [m for m in rec.conversation_messages(cid) if m["id"] == a]
        assert "(cut off at 96 tokens)" in recorded_note(answer, facts)
        md = rec.export_conversation(cid, tmp_path, "md").read_text()
        assert "## m (cut off at 96 tokens)" in md, md
