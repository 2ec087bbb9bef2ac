select * from (
    values ('c1', 'ada@example.com', 'Ada'), ('c2', 'grace@example.com', 'Grace')
) as t (customer_id, email, first_name)
